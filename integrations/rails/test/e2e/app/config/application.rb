# frozen_string_literal: true

# A small shop in front of which test/e2e/e2e_test.rb runs a real gateway. It loads the
# gem from this checkout, as `gem "tessera-rails", path: ...` would.
$LOAD_PATH.unshift File.expand_path("../../../../lib", __dir__)
require "rails"
require "active_record/railtie"
require "action_controller/railtie"
require "action_view/railtie"
require "tessera-rails"

class ShopApp < Rails::Application
  config.load_defaults 6.1
  config.root = File.expand_path("..", __dir__)
  config.eager_load = true
  config.cache_classes = true
  config.secret_key_base = "e2e" * 32
  config.hosts.clear
  config.logger = Logger.new($stderr, level: ENV.fetch("SHOP_LOG_LEVEL", "warn"))
  config.active_support.deprecation = :stderr
  config.session_store :cookie_store, key: "_shop_session"
  config.action_controller.allow_forgery_protection = true
  config.consider_all_requests_local = true
end
