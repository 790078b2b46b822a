# frozen_string_literal: true

# Rails side of Tessera, the fragment-cache gateway. The gateway proxies the app's pages
# and fills their `<esi:include>`s from its cache; its workers render each fragment by
# GETting a render action of the app. This gem writes both halves:
#
# - Tessera::Helper     `tessera_fragment`, the include (or a client.js placeholder)
# - Tessera::Middleware `Surrogate-Control: content="ESI/1.0"` on pages that wrote one
# - Tessera::Render     render actions: token check, shareable Cache-Control, tags
# - Tessera::User       the stable per-user cookie per-user fragments vary on
# - Tessera::Model      `tessera_tags`: purge a model's tags after each commit
# - Tessera::Admin      purges over the gateway's admin API
# - Tessera::Route      a declared render action, written as a `[[fragment]]` route
#
# Only Tessera::Markup, Tessera::Route and Tessera::Admin work without Rails loaded.

require "tessera/version"

module Tessera
  # Every error this gem raises.
  class Error < StandardError; end
end

require "tessera/configuration"
require "tessera/markup"
require "tessera/route"
require "tessera/admin"

module Tessera
  class << self
    # The configuration, read from the environment on first use.
    def config
      @config ||= Configuration.new
    end

    # Drops the configuration, so the next use reads the environment again (tests).
    def reset_config!
      @config = nil
    end

    # Sets the configuration:
    #
    #   Tessera.configure { |c| c.admin_url = "http://10.0.0.5:9090" }
    def configure
      yield config
    end

    # Render actions declared with `tessera_render`, by route name.
    def routes
      @routes ||= {}
    end

    # Purges fragments on every gateway through the admin API; answers the gateway's JSON
    # answers, one per purge. Raises Tessera::PurgeError when one fails.
    #
    #   Tessera.purge(tags: ["product-42"])
    #   Tessera.purge(route: :recommendations)
    #   Tessera.purge(fragment: :recommendations, params: { user_id: 7 })
    def purge(tags: nil, route: nil, fragment: nil, params: {}, cookies: {}, headers: {})
      if tags.nil? && route.nil? && fragment.nil?
        raise ArgumentError, "name tags:, route: or fragment: to purge"
      end

      admin = Admin.new(config)
      results = Array(tags).map { |tag| admin.purge_tag(tag) }
      results << admin.purge_route(route) if route
      if fragment
        results << admin.purge_fragment(fragment, params, cookies: cookies, headers: headers)
      end
      results
    end
  end
end

require "tessera/railtie" if defined?(Rails::Railtie)
