# frozen_string_literal: true

module Tessera
  # Settings, each defaulting to its environment variable where it has one.
  class Configuration
    # The gateway's admin listener (`gateway.admin_listen`). Env `TESSERA_ADMIN_URL`.
    attr_accessor :admin_url
    # `gateway.admin_token`, sent as `Authorization: Bearer`. Env `TESSERA_ADMIN_TOKEN`.
    attr_accessor :admin_token
    # The secret the fragment workers send in `Tessera-Render-Token`
    # (`workers.render_token`). When set, render actions answer 404 to requests without
    # it; when unset they answer everyone. Env `TESSERA_RENDER_TOKEN`.
    attr_accessor :render_token
    # `gateway.fragment_prefix`: where the gateway serves fragments.
    attr_accessor :fragment_prefix
    # Name of the stable per-user cookie (see Tessera::User).
    attr_accessor :user_cookie
    # Seconds to connect to, and then to hear from, the admin listener.
    attr_accessor :admin_timeout
    # Called with the error and the record when a model's after-commit purge fails. The
    # record is saved by then, so the default logs the error and lets the request go on;
    # its fragments are then served until their `fresh` + `stale` run out.
    attr_accessor :on_purge_error

    def initialize(env = ENV)
      @admin_url = present(env["TESSERA_ADMIN_URL"]) || "http://127.0.0.1:9090"
      @admin_token = present(env["TESSERA_ADMIN_TOKEN"])
      @render_token = present(env["TESSERA_RENDER_TOKEN"])
      @fragment_prefix = "/fragments/"
      @user_cookie = "tessera_user"
      @admin_timeout = 5
      @on_purge_error = method(:log_purge_error)
    end

    private

    def present(value)
      value.nil? || value.strip.empty? ? nil : value
    end

    def log_purge_error(error, record)
      logger = defined?(Rails) && Rails.respond_to?(:logger) ? Rails.logger : nil
      message = "Tessera purge after saving #{record.class.name} #{record.id.inspect} failed: #{error.message}"
      logger ? logger.error(message) : warn(message)
    end
  end
end
