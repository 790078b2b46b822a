# frozen_string_literal: true

module Tessera
  # A render action declared with `tessera_render`: one `[[fragment]]` route of the
  # gateway's config, whose `render` path is read from the app's routes.
  class Route
    # Options that become TOML keys as they are (durations: seconds, an
    # ActiveSupport::Duration, or the gateway's own "250ms" / "10s" / "10m" text).
    DURATIONS = %i[fresh stale refresh_ahead failed_ttl build_timeout].freeze
    OTHERS = %i[params vary shareable max_attempts placeholder fallback queue].freeze
    DURATION_TEXT = /\A\d+(ms|s|m|h|d)\z/.freeze
    # The gateway's default `fresh`, used as the render answer's max-age when none is given.
    DEFAULT_FRESH = 60

    attr_reader :name, :controller_path, :action, :options

    def initialize(name, controller_path:, action:, **options)
      @name = name.to_s
      unless Markup::NAME.match?(@name)
        raise ArgumentError, "tessera_render #{@name.inspect}: a route name is [a-z0-9_-], 1-64 bytes"
      end

      unknown = options.keys - DURATIONS - OTHERS
      raise ArgumentError, "tessera_render #{@name}: unknown options #{unknown.inspect}" if unknown.any?

      @controller_path = controller_path
      @action = action.to_s
      @options = options
      DURATIONS.each { |key| duration(options[key]) if options.key?(key) }
      vary # checks the sources now, where the declaration is
    end

    # The route's `vary` sources: `:user` is the stable per-user cookie (Tessera::User);
    # anything else is written as given ("cookie:NAME", "header:NAME").
    def vary(config = Tessera.config)
      Array(options[:vary]).map do |source|
        next "cookie:#{config.user_cookie}" if source.to_s == "user"

        source = source.to_s
        unless source.start_with?("cookie:", "header:")
          raise ArgumentError, "tessera_render #{name}: vary #{source.inspect} is neither :user, " \
                               "\"cookie:NAME\" nor \"header:NAME\""
        end
        source
      end
    end

    def params
      Array(options[:params]).map(&:to_s)
    end

    # Whether answers differ per user: then they are marked private, else public.
    def per_user?
      !vary.empty?
    end

    # Seconds the render answer says it may be kept: the route's `fresh`.
    def max_age
      fresh = options[:fresh]
      return DEFAULT_FRESH if fresh.nil?

      seconds(fresh)
    end

    # The route as a `[[fragment]]` table, rendered at `render`.
    def to_toml(render, config = Tessera.config)
      lines = ["[[fragment]]", "name = #{Route.toml(name)}", "render = #{Route.toml(render)}"]
      lines << "params = #{Route.toml(params)}" unless params.empty?
      lines << "vary = #{Route.toml(vary(config))}" unless vary(config).empty?
      (OTHERS - %i[params vary]).each do |key|
        lines << "#{key} = #{Route.toml(options[key])}" if options.key?(key)
      end
      DURATIONS.each do |key|
        lines << "#{key} = #{Route.toml(duration(options[key]))}" if options.key?(key)
      end
      lines.join("\n")
    end

    # A TOML value: basic strings (escaped as TOML 1.0 says), arrays, integers, booleans.
    def self.toml(value)
      case value
      when Array then "[#{value.map { |v| toml(v) }.join(', ')}]"
      when Integer, true, false then value.to_s
      else
        escaped = value.to_s.gsub(/[\\"\u0000-\u001f\u007f]/) do |c|
          case c
          when "\\" then "\\\\"
          when '"' then '\\"'
          else format("\\u%04X", c.ord)
          end
        end
        %("#{escaped}")
      end
    end

    private

    def duration(value)
      case value
      when String
        return value if DURATION_TEXT.match?(value)

        raise ArgumentError, "tessera_render #{name}: duration #{value.inspect} is not like \"250ms\", \"10s\", \"10m\""
      when Integer then "#{value}s"
      when Numeric then "#{(value * 1000).round}ms"
      else
        return "#{value.to_i}s" if value.respond_to?(:to_i) && value.class.name == "ActiveSupport::Duration"

        raise ArgumentError, "tessera_render #{name}: duration #{value.inspect} is not a number of seconds"
      end
    end

    def seconds(value)
      text = duration(value)
      number = text.to_i
      case text[/[a-z]+\z/]
      when "ms" then number / 1000
      when "m" then number * 60
      when "h" then number * 3600
      when "d" then number * 86_400
      else number
      end
    end
  end
end
