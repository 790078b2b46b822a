# frozen_string_literal: true

# End to end: the shop in test/e2e/app behind a real tessera-gateway (embedded mode: no
# memcached or RabbitMQ), configured with the routes `rake tessera:routes` prints.
#
#   ruby test/e2e/e2e_test.rb   (TESSERA_GATEWAY_BIN: the gateway; default target/debug)
require "minitest/autorun"
require "fileutils"
require "json"
require "net/http"
require "socket"
require "tmpdir"
require "uri"

# RENDER-TOKEN: the gateway's workers send it in `Tessera-Render-Token`
# (workers.render_token / TESSERA_RENDER_TOKEN). It is given to the app and to the
# gateway, and test_render_path_refuses_requests_without_the_token checks the refusal
# (nil turns it off).
RENDER_TOKEN = "e2e-render-secret"

module Shop
  APP = File.expand_path("app", __dir__)
  REPO = File.expand_path("../../../..", __dir__)
  GATEWAY = ENV.fetch("TESSERA_GATEWAY_BIN", File.join(REPO, "target/debug/tessera-gateway"))
  ADMIN_TOKEN = "e2e-admin-token"
  class GatewayExited < RuntimeError; end

  class << self
    attr_reader :app_url, :gateway_url, :admin_url, :dir

    # The gateway's admin port is picked before the app starts (the app is told it), so
    # another process may take it meanwhile: then everything starts again on another.
    def start
      Minitest.after_run { stop } # at_exit would run before the tests
      attempts = 0
      begin
        attempts += 1
        start_once
      rescue GatewayExited
        stop
        retry if attempts < 3
        raise
      end
    end

    def start_once
      @dir = Dir.mktmpdir("tessera-rails-e2e")
      @pids = []
      admin_port = free_port
      @admin_url = "http://127.0.0.1:#{admin_port}"
      env = {
        "DATABASE_URL" => "sqlite3:#{@dir}/shop.sqlite3",
        "TESSERA_ADMIN_URL" => @admin_url,
        "TESSERA_ADMIN_TOKEN" => ADMIN_TOKEN,
        "TESSERA_RENDER_TOKEN" => RENDER_TOKEN.to_s,
        "PORT_FILE" => "#{@dir}/app.port"
      }
      @pids << spawn(env, "ruby", "bin/serve", chdir: APP, out: "#{@dir}/app.log", err: [:child, :out])
      @app_url = "http://127.0.0.1:#{wait_for_file("#{@dir}/app.port", "the app (#{@dir}/app.log)")}"
      File.write("#{@dir}/tessera.toml", gateway_config(env, admin_port))
      check = `#{GATEWAY} --config #{@dir}/tessera.toml check 2>&1`
      raise "the gateway refuses the config:\n#{check}" unless $?.success?

      start_gateway
    end

    def stop
      (@pids || []).reverse_each do |pid|
        Process.kill("TERM", pid)
        deadline = Time.now + 10
        sleep 0.05 until Process.wait(pid, Process::WNOHANG) || Time.now > deadline
        if Time.now > deadline
          Process.kill("KILL", pid)
          Process.wait(pid)
        end
      rescue Errno::ESRCH, Errno::ECHILD
        nil
      end
      @pids = []
      FileUtils.rm_rf(@dir) if @dir && !ENV["TESSERA_E2E_KEEP"]
    end

    # The end of each process's log, for a failed test.
    def logs
      %w[app.log gateway.log].map do |name|
        path = File.join(@dir, name)
        lines = File.exist?(path) ? File.readlines(path).last(40).join : "(none)\n"
        "---- #{name} (last 40 lines)\n#{lines}"
      end.join
    end

    private

    def gateway_config(env, admin_port)
      routes = IO.popen(env, ["rake", "tessera:routes"], chdir: APP, err: [:child, :out], &:read)
      raise "rake tessera:routes failed:\n#{routes}" unless $?.success?

      <<~TOML + routes
        [gateway]
        listen = "127.0.0.1:0"
        admin_listen = "127.0.0.1:#{admin_port}"
        admin_token = "#{ADMIN_TOKEN}"

        [upstream]
        url = "#{@app_url}"

      TOML
    end

    def start_gateway
      raise "no gateway at #{GATEWAY}: cargo build -p tessera-gateway" unless File.executable?(GATEWAY)

      log = "#{@dir}/gateway.log"
      # RUST_LIB_BACKTRACE=0: an error exit (a port taken) is not held up symbolizing a
      # backtrace of the debug build; panics still have theirs.
      env = { "TESSERA_LOG_FORMAT" => "json", "RUST_LOG" => "info", "RUST_LIB_BACKTRACE" => "0",
              "TESSERA_RENDER_TOKEN" => RENDER_TOKEN.to_s }
      pid = spawn(env, GATEWAY, "--config", "#{@dir}/tessera.toml", out: log, err: [:child, :out])
      @pids << pid
      deadline = Time.now + 30
      until Time.now > deadline
        line = File.exist?(log) && File.foreach(log).find { |l| l.include?('"gateway listening"') }
        return @gateway_url = "http://#{JSON.parse(line).fetch('addr')}" if line
        raise GatewayExited, "the gateway exited:\n#{File.read(log)}" if Process.wait(pid, Process::WNOHANG)

        sleep 0.1
      end
      raise "the gateway did not start:\n#{File.read(log)}"
    end

    def wait_for_file(path, what)
      deadline = Time.now + 60
      until Time.now > deadline
        text = File.exist?(path) && File.read(path)
        return text.to_i if text && !text.empty?

        sleep 0.1
      end
      raise "#{what} did not start"
    end

    def free_port
      server = TCPServer.new("127.0.0.1", 0)
      server.addr[1]
    ensure
      server&.close
    end
  end
end

# A browser, as far as cookies go.
class Browser
  attr_reader :cookies

  def initialize(base)
    @base = URI(base)
    @cookies = {}
  end

  def get(path, headers = {})
    request(Net::HTTP::Get.new(path, headers))
  end

  def post(path, form)
    req = Net::HTTP::Post.new(path)
    req.set_form_data(form)
    request(req)
  end

  def form_token(html)
    html[/name="authenticity_token" value="([^"]+)"/, 1] or raise "no authenticity_token in:\n#{html}"
  end

  private

  def request(req)
    req["Cookie"] = @cookies.map { |k, v| "#{k}=#{v}" }.join("; ") unless @cookies.empty?
    response = Net::HTTP.start(@base.host, @base.port, read_timeout: 30) { |http| http.request(req) }
    Array(response.get_fields("set-cookie")).each do |line|
      name, value = line.split(";", 2).first.split("=", 2)
      @cookies[name] = value
    end
    response
  end
end

Shop.start

class E2ETest < Minitest::Test
  WAIT = { "Prefer" => "wait=20" }.freeze

  def teardown
    return if passed? || @@logs_shown

    @@logs_shown = true
    puts "\n#{Shop.logs}"
  end
  @@logs_shown = false

  def gateway
    Browser.new(Shop.gateway_url)
  end

  # The fragment, waiting for its build.
  def fragment(browser, src)
    response = browser.get(src, WAIT)
    assert_equal "200", response.code, "#{src}: #{response.body}"
    response.body
  end

  def test_the_page_is_composed
    browser = gateway
    browser.get("/products/1") # a new visitor: gets the user cookie, placeholders
    fragment(browser, "/fragments/product?id=1")
    fragment(browser, "/fragments/account?product_id=1")
    page = browser.get("/products/1")
    assert_equal "200", page.code
    body = page.body
    assert_includes body, "<h2>Product 1</h2>"
    assert_includes body, '<a href="/login">Sign in</a>'
    refute_includes body, "esi:include"
    refute_includes body, "tessera-fragment"
    assert_nil page["surrogate-control"]
    assert_nil page["surrogate-key"]

    crawler = gateway.get("/products/1").body # keeps no cookies: a new visitor each time
    assert_includes crawler, "<h2>Product 1</h2>"
    assert_includes crawler, 'data-tessera-src="/fragments/account?product_id=1"'
  end

  def test_without_the_gateway_the_page_has_placeholders
    page = Browser.new(Shop.app_url).get("/products/1")
    assert_includes page.body, 'data-tessera-src="/fragments/product?id=1"'
    assert_includes page.body, '<script src="/_tessera/client.js" defer></script>'
    assert_nil page["surrogate-control"]
  end

  def test_users_see_their_own_fragment_and_its_form_posts_and_purges
    alice = sign_in("alice", 2)
    bob = sign_in("bob", 2)
    assert_match(%r{Signed in as <b class="user">alice</b>}, alice_page = alice.get("/products/2").body)
    assert_match(%r{Signed in as <b class="user">bob</b>}, bob.get("/products/2").body)
    refute_includes alice_page, "tessera-fragment"
    before = alice_page[/rendered ([^<]+)/, 1]
    refute_nil before

    # The form came from alice's cached fragment; its token must pass Rails' check.
    renamed = alice.post("/products/2", "_method" => "patch", "authenticity_token" => alice.form_token(alice_page),
                                        "product[name]" => "Renamed by alice")
    assert_equal "302", renamed.code, renamed.body

    # The save purged tag product-2: the product fragment is built anew.
    assert_includes fragment(alice, "/fragments/product?id=2"), "<h2>Renamed by alice</h2>"
    page = bob.get("/products/2").body
    assert_includes page, "<h2>Renamed by alice</h2>"
    refute_equal before, page[/rendered ([^<]+)/, 1]
    assert_operator purges_made, :>=, 1
  end

  def test_a_forged_post_is_refused
    alice = sign_in("carol", 3)
    response = alice.post("/products/3", "_method" => "patch", "authenticity_token" => "forged",
                                         "product[name]" => "x")
    assert_equal "422", response.code
  end

  def test_render_path_refuses_requests_without_the_token
    app = Browser.new(Shop.app_url)
    if RENDER_TOKEN
      assert_equal "404", app.get("/_render/product?id=1").code
      assert_equal "200", app.get("/_render/product?id=1", "Tessera-Render-Token" => RENDER_TOKEN).code
      # Through the gateway render paths are closed, whatever a client sends.
      assert_equal "404", gateway.get("/_render/product?id=1", "Tessera-Render-Token" => RENDER_TOKEN).code
    else
      assert_equal "200", app.get("/_render/product?id=1").code, "no token: render paths answer everyone"
    end
  end

  private

  # Signs in through the gateway and waits for the user's fragments.
  def sign_in(name, product)
    browser = gateway
    login = browser.get("/login")
    response = browser.post("/login", "name" => name, "authenticity_token" => browser.form_token(login.body))
    assert_equal "302", response.code, response.body
    page = browser.get("/products/#{product}").body
    assert_includes page, %(data-tessera-src="/fragments/account?product_id=#{product}"), "a new user cookie: placeholders"
    fragment(browser, "/fragments/account?product_id=#{product}")
    fragment(browser, "/fragments/product?id=#{product}")
    browser
  end

  def purges_made
    uri = URI("#{Shop.admin_url}/metrics")
    req = Net::HTTP::Get.new(uri)
    req["Authorization"] = "Bearer #{Shop::ADMIN_TOKEN}"
    metrics = Net::HTTP.start(uri.host, uri.port) { |http| http.request(req) }.body
    metrics[/^tessera_tag_purges_total (\d+)/, 1].to_i
  end
end
