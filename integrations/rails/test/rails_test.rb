# frozen_string_literal: true

require_relative "test_helper"
require "tessera/routes_printer"

class RailsTest < ActionDispatch::IntegrationTest
  ESI = { "Surrogate-Capability" => 'tessera="ESI/1.0"' }.freeze

  def setup
    Tessera.reset_config!
  end

  def set_cookies
    Array(response.headers["Set-Cookie"]).flat_map { |h| h.split("\n") }.map { |c| c[/\A[^=]+/] }
  end

  def test_through_the_gateway_a_page_writes_includes_and_asks_for_esi
    get "/page", headers: ESI # sets the user cookie: not composed yet
    get "/page", headers: ESI
    assert_equal 'content="ESI/1.0"', response.headers["Surrogate-Control"]
    assert_includes response.body, '<esi:include src="/fragments/recs?limit=5&amp;tag=a+b&amp;tag=c%26d"/>'
    assert_includes response.body, '<esi:include src="/fragments/cart"/>'
    refute_includes response.body, "client.js"
  end

  def test_a_page_that_writes_the_user_cookie_leaves_per_user_fragments_to_the_browser
    get "/page", headers: ESI
    assert_includes set_cookies, "tessera_user"
    assert_equal 'content="ESI/1.0"', response.headers["Surrogate-Control"]
    assert_includes response.body, '<esi:include src="/fragments/recs?limit=5&amp;tag=a+b&amp;tag=c%26d"/>'
    assert_includes response.body, 'data-tessera-src="/fragments/cart"'
    assert_equal 1, response.body.scan("client.js").size
  end

  def test_a_client_without_cookies_gets_shared_fragments_composed
    3.times do
      cookies.delete("tessera_user")
      get "/page", headers: ESI
      assert_includes set_cookies, "tessera_user"
      assert_includes response.body, '<esi:include src="/fragments/recs?limit=5&amp;tag=a+b&amp;tag=c%26d"/>'
    end
  end

  def test_without_the_gateway_a_page_writes_placeholders_and_the_script_once
    get "/page"
    get "/page"
    assert_nil response.headers["Surrogate-Control"]
    body = response.body
    assert_includes body, '<div class="tessera-fragment" data-tessera-src="/fragments/recs?limit=5&amp;tag=a+b&amp;tag=c%26d">' \
                          '<div class="tessera-loading">Loading…</div><template class="tessera-fallback">' \
                          '<div class="tessera-unavailable">This content is unavailable right now.</div></template></div>'
    assert_includes body, '<div class="tessera-fragment" data-tessera-src="/fragments/cart">&lt;b&gt;wait&lt;/b&gt;' \
                          '<template class="tessera-fallback">no cart</template></div>'
    assert_equal 1, body.scan('<script src="/_tessera/client.js" defer></script>').size
  end

  def test_an_app_without_tessera_user_composes_at_once
    get "/other", headers: ESI
    assert_equal 'content="ESI/1.0"', response.headers["Surrogate-Control"]
    assert_equal 2, response.body.scan('<esi:include src="/fragments/recs"/>').size
    refute_includes set_cookies, "tessera_user"
  end

  def test_a_page_without_fragments_is_not_marked
    get "/plain", headers: ESI
    assert_nil response.headers["Surrogate-Control"]
  end

  def test_render_actions_are_shareable_and_tagged
    get "/_render/recs", params: { limit: 5 }, headers: ESI
    assert_equal 200, response.status
    assert_equal "recs 5", response.body
    assert_equal "max-age=30, public", response.headers["Cache-Control"]
    assert_equal "shelf-1 product-5", response.headers["Surrogate-Key"]
    assert_empty set_cookies
    assert_nil response.headers["Surrogate-Control"]

    get "/_render/cart"
    assert_equal "max-age=10, private", response.headers["Cache-Control"]
    assert_nil response.headers["Surrogate-Key"]
    assert_empty set_cookies
  end

  def test_render_token_when_configured
    get "/_render/plain"
    assert_equal 200, response.status, "no token configured: everyone is answered"

    Tessera.config.render_token = "s3cret"
    get "/_render/plain"
    assert_equal 404, response.status
    get "/_render/plain", headers: { "Tessera-Render-Token" => "s3cre" }
    assert_equal 404, response.status
    get "/_render/plain", headers: { "Tessera-Render-Token" => "s3cret!" }
    assert_equal 404, response.status
    get "/_render/plain", headers: { "Tessera-Render-Token" => "s3cret" }
    assert_equal 200, response.status
    assert_equal "plain", response.body
    get "/plain"
    assert_equal 200, response.status, "pages need no token"
  end

  def test_render_token_is_checked_before_the_app_callbacks
    Tessera.config.render_token = "s3cret"
    get "/_render/guarded"
    assert_equal 404, response.status
    get "/_render/guarded", headers: { "Tessera-Render-Token" => "s3cret" }
    assert_equal 403, response.status, "then the app's own callbacks run"
  end

  def test_render_token_from_the_environment
    Tessera.instance_variable_set(:@config, Tessera::Configuration.new("TESSERA_RENDER_TOKEN" => "env-token"))
    get "/_render/plain", headers: { "Tessera-Render-Token" => "other" }
    assert_equal 404, response.status
    get "/_render/plain", headers: { "Tessera-Render-Token" => "env-token" }
    assert_equal 200, response.status
  end

  # Why the gem has its own cookie: the session cookie changes on every request that
  # reads the session, the user cookie does not.
  def test_session_cookie_changes_each_request_the_user_cookie_does_not
    get "/token"
    post "/login", params: { user: "7", authenticity_token: response.body }
    values = 3.times.map do
      get "/page"
      assert_includes set_cookies, "_test_session"
      [cookies["_test_session"], cookies["tessera_user"]]
    end
    assert_equal 3, values.map(&:first).uniq.size, "the session cookie was re-encrypted each time"
    assert_equal 1, values.map(&:last).uniq.size, "the user cookie stayed"
    refute_includes set_cookies, "tessera_user"
  end

  def test_a_form_in_a_per_user_fragment_posts
    get "/page"
    user_cookie = cookies["tessera_user"]
    refute_nil user_cookie
    worker = open_session
    worker.get "/_render/cart", headers: { "Cookie" => "tessera_user=#{Rack::Utils.escape(user_cookie)}" }
    who, token = worker.response.body.delete_prefix("cart of ").split(":", 2)
    assert_equal "nil", who
    assert_empty Array(worker.response.headers["Set-Cookie"])

    post "/update", params: { authenticity_token: token }
    assert_equal 200, response.status
    post "/update", params: { authenticity_token: token.reverse }
    assert_equal 422, response.status
  end

  def test_a_new_user_gets_a_new_cookie_and_csrf_secret
    get "/token"
    anonymous_token = response.body
    anonymous_cookie = cookies["tessera_user"]
    post "/login", params: { user: "7", authenticity_token: anonymous_token }
    assert_equal 200, response.status

    get "/page", headers: ESI
    refute_equal anonymous_cookie, cookies["tessera_user"]
    refute_includes response.body, '<esi:include src="/fragments/cart"/>', "the browser does not hold the new cookie yet"
    assert_includes response.body, 'data-tessera-src="/fragments/cart"'
    get "/page", headers: ESI
    assert_includes response.body, '<esi:include src="/fragments/cart"/>'
    post "/update", params: { authenticity_token: anonymous_token }
    assert_equal 422, response.status

    worker = open_session
    worker.get "/_render/cart", headers: { "Cookie" => "tessera_user=#{Rack::Utils.escape(cookies["tessera_user"])}" }
    who, token = worker.response.body.delete_prefix("cart of ").split(":", 2)
    assert_equal "&quot;7&quot;", who
    post "/update", params: { authenticity_token: token }
    assert_equal 200, response.status
  end

  def test_a_render_action_without_cookie_has_no_user
    get "/_render/cart"
    assert_match(/\Acart of nil:/, response.body)
  end

  def test_routes_are_printed_from_the_declarations
    toml = Tessera::RoutesPrinter.toml(Rails.application)
    assert_includes toml, <<~TOML
      [[fragment]]
      name = "cart"
      render = "/_render/cart"
      vary = ["cookie:tessera_user"]
      placeholder = "<p>…</p>"
      fresh = "10s"

      [[fragment]]
      name = "guarded"
      render = "/_render/guarded"

      [[fragment]]
      name = "plain_one"
      render = "/_render/plain"

      [[fragment]]
      name = "recs"
      render = "/_render/recs"
      params = ["limit"]
      fresh = "30s"
      stale = "600s"
    TOML
  end

  def test_routes_need_a_static_get_route
    missing = Tessera::Route.new(:gone, controller_path: "fragments", action: "gone")
    error = assert_raises(Tessera::Error) { Tessera::RoutesPrinter.render_path(Rails.application, missing) }
    assert_match(/no GET route leads to fragments#gone/, error.message)
    page = Tessera::Route.new(:page, controller_path: "pages", action: "update")
    assert_raises(Tessera::Error) { Tessera::RoutesPrinter.render_path(Rails.application, page) }
  end

  def test_a_route_name_belongs_to_one_action
    error = assert_raises(ArgumentError) do
      Class.new(ActionController::Base) do
        def self.name
          "OtherFragmentsController"
        end

        include Tessera::Render
        tessera_render :recs
      end
    end
    assert_match(/already declared by fragments#recs/, error.message)
  end
end
