# frozen_string_literal: true

require_relative "test_helper"

class ModelTest < Minitest::Test
  def setup
    @admin = FakeAdmin.new
    Tessera.reset_config!
    Tessera.config.admin_url = @admin.url
  end

  def teardown
    @admin.stop
    Tessera.reset_config!
  end

  def test_commits_purge_the_record_tags
    Tessera.config.admin_token = "adm"
    product = Product.create!(name: "a")
    product.update!(name: "b")
    product.destroy!
    requests = @admin.taken
    tags = ["/tags/product-#{product.id}", "/tags/products"]
    assert_equal tags * 3, requests.map(&:path)
    assert_equal ["DELETE"], requests.map(&:verb).uniq
    assert_equal ["Bearer adm"], requests.map { |r| r.headers["authorization"] }.uniq
  end

  def test_a_rolled_back_save_purges_nothing
    Product.transaction do
      Product.create!(name: "a")
      raise ActiveRecord::Rollback
    end
    assert_empty @admin.taken
  end

  def test_a_failed_purge_is_reported_and_the_save_stands
    @admin.status = 503
    failures = []
    Tessera.config.on_purge_error = ->(error, record) { failures << [error.status, record.name] }
    product = Product.create!(name: "kept")
    assert_equal [[503, "kept"]], failures
    assert Product.exists?(product.id)
  end

  def test_purge_raises_what_the_gateway_refused
    @admin.status = 401
    error = assert_raises(Tessera::PurgeError) { Tessera.purge(tags: "x") }
    assert_equal 401, error.status
    Tessera.config.admin_url = "http://127.0.0.1:1"
    error = assert_raises(Tessera::PurgeError) { Tessera.purge(route: :recs) }
    assert_match(/cannot reach the gateway's admin API/, error.message)
    assert_nil error.status
  end

  def test_purge_paths
    Tessera.config.admin_url = "#{@admin.url}/"
    results = Tessera.purge(tags: ["a%b#c", "é"], route: :recs, fragment: :cart,
                            params: { id: 7, q: "x y" }, cookies: { "tessera_user" => "v=1" },
                            headers: { "Accept-Language" => "fr" })
    requests = @admin.taken
    assert_equal ["/tags/a%25b%23c", "/tags/%C3%A9", "/routes/recs", "/fragments/cart?id=7&q=x+y"], requests.map(&:path)
    assert_equal "tessera_user=v%3D1", requests.last.headers["cookie"]
    assert_equal "fr", requests.last.headers["accept-language"]
    assert_nil requests.first.headers["authorization"]
    assert_equal "/routes/recs", results[2]["path"]
    assert_raises(ArgumentError) { Tessera.purge }
  end

  def test_admin_settings_from_the_environment
    config = Tessera::Configuration.new("TESSERA_ADMIN_URL" => "http://gw:9", "TESSERA_ADMIN_TOKEN" => " ")
    assert_equal "http://gw:9", config.admin_url
    assert_nil config.admin_token
    assert_equal "http://127.0.0.1:9090", Tessera::Configuration.new({}).admin_url
  end
end
