# frozen_string_literal: true

require "active_support/concern"
require "active_support/security_utils"

module Tessera
  # Render actions: what the fragment workers GET to build a fragment.
  #
  #   class FragmentsController < ActionController::Base
  #     include Tessera::Render
  #     tessera_render :recommendations, params: [:limit], vary: :user, fresh: 1.minute
  #     def recommendations
  #       tessera_tags "user-#{tessera_user_id}"
  #     end
  #   end
  #
  # Each declared action
  # - answers 404 to a request without the render token, when one is configured
  #   (`Tessera.config.render_token`; constant-time compare), before any other callback;
  # - answers `Cache-Control: public, max-age={fresh}` (`private` on a `vary` route), so
  #   the gateway stores it: Rails marks answers private by default, and the gateway
  #   refuses a private answer on a route shared by everyone;
  # - sends `Surrogate-Key` with the tags given to `tessera_tags`;
  # - writes no session cookie, and renders without a layout.
  module Render
    extend ActiveSupport::Concern
    # At most this many distinct tags per fragment, each of token characters and at most
    # 128 bytes, as the gateway checks (a render answer over a limit fails its build).
    MAX_TAGS = 32
    TAG = /\A[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}\z/.freeze

    included do
      class_attribute :tessera_render_routes, instance_writer: false, default: {}
      layout false
      prepend_before_action :tessera_render_start
      after_action :tessera_render_finish
    end

    class_methods do
      # Declares `action` (default: the route's name) the render action of route `name`.
      # Options are the route's `[[fragment]]` keys (see Tessera::Route).
      def tessera_render(name, action: name, **options)
        route = Route.new(name, controller_path: controller_path, action: action, **options)
        known = Tessera.routes[route.name]
        if known && [known.controller_path, known.action] != [route.controller_path, route.action]
          raise ArgumentError, "tessera_render #{route.name}: already declared by " \
                               "#{known.controller_path}##{known.action}"
        end

        Tessera.routes[route.name] = route
        self.tessera_render_routes = tessera_render_routes.merge(route.action => route)
      end
    end

    # Tags this fragment (`Surrogate-Key`), so `Tessera.purge(tags:)` retires it.
    def tessera_tags(*tags)
      tags = tags.flatten.map(&:to_s)
      bad = tags.reject { |tag| TAG.match?(tag) }
      raise ArgumentError, "tessera_tags: #{bad.inspect} must be 1-128 token characters" if bad.any?

      @tessera_tags = ((@tessera_tags || []) + tags).uniq
      raise ArgumentError, "tessera_tags: at most #{MAX_TAGS} tags per fragment" if @tessera_tags.size > MAX_TAGS

      @tessera_tags
    end

    private

    def tessera_render_start
      @tessera_route = tessera_render_routes[action_name]
      return if @tessera_route.nil?

      request.session_options[:skip] = true
      expected = Tessera.config.render_token
      return if expected.nil? || expected.empty?

      given = request.headers["Tessera-Render-Token"].to_s
      head :not_found unless ActiveSupport::SecurityUtils.secure_compare(given, expected)
    end

    def tessera_render_finish
      return if @tessera_route.nil?

      control = response.cache_control
      control[:public] = !@tessera_route.per_user?
      control[:private] = @tessera_route.per_user?
      control[:max_age] = @tessera_route.max_age
      response.headers["Surrogate-Key"] = @tessera_tags.join(" ") if @tessera_tags&.any?
    end
  end
end
