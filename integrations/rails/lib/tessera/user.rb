# frozen_string_literal: true

require "active_support/concern"

module Tessera
  # The stable per-user cookie that per-user fragments (`vary: :user`) are keyed on.
  #
  # Why not the session cookie: Rails' cookie store encrypts the session afresh (new IV)
  # every time a request loads it, so its value changes on nearly every request, and a
  # route varying on it builds a new fragment per request and never hits. This cookie
  # (`Tessera.config.user_cookie`, encrypted, HttpOnly) is written only when it is
  # missing or names another user than `tessera_user { ... }` says, so its value, and the
  # fragment's key, stay the same for as long as the user does.
  #
  # The fragment workers send a render action only the route's `vary` cookies, not the
  # session: a render action reads the user with `tessera_user_id`.
  #
  # CSRF: a form in a per-user fragment must carry a token that the POST is checked
  # against, and the render action has no session. So, unless `csrf: false`, this cookie
  # also holds the CSRF secret Rails keeps in the session otherwise (as Rails 7.1's
  # `protect_from_forgery store: :cookie` does): every token of the app, in pages and in
  # fragments, is then made and checked against it. A new user gets a new secret.
  module User
    extend ActiveSupport::Concern

    included do
      class_attribute :tessera_user_identify, instance_writer: false
      class_attribute :tessera_user_csrf, instance_writer: false, default: true
    end

    class_methods do
      # Who the visitor is, evaluated in the controller: `tessera_user { current_user&.id }`.
      def tessera_user(csrf: true, &identify)
        raise ArgumentError, "tessera_user needs a block naming the user" unless identify

        self.tessera_user_identify = identify
        self.tessera_user_csrf = csrf
      end
    end

    # The user id the request's cookie names, as a string (nil for an anonymous visitor or
    # no cookie). In render actions this is how the fragment knows its user.
    def tessera_user_id
      data = tessera_render_action? || tessera_user_identify.nil? ? tessera_user_cookie : tessera_user!
      data && data["u"]
    end

    private

    def tessera_render_action?
      !@tessera_route.nil?
    end

    # The cookie's contents for this request, (re)written when it is missing, names
    # another user, or lacks the CSRF secret. Render actions never write it.
    def tessera_user!
      return tessera_user_cookie if tessera_render_action? || tessera_user_identify.nil?

      uid = instance_exec(&tessera_user_identify)&.to_s
      data = tessera_user_cookie
      return data if data && data["u"] == uid && (!tessera_user_csrf || data["c"].is_a?(String))

      data = { "u" => uid }
      data["c"] = generate_csrf_token if tessera_user_csrf
      cookies.encrypted[Tessera.config.user_cookie] = { value: data, httponly: true }
      @tessera_user_written = true
      @tessera_user_cookie = data
    end

    # Whether this request (re)wrote the cookie: the browser does not hold it yet, so the
    # page's per-user includes would be composed with the old one (Tessera::Helper then
    # writes placeholders, which the browser fetches with the new cookie).
    def tessera_user_changed?
      return false if tessera_user_identify.nil?

      tessera_user!
      @tessera_user_written == true
    end

    def tessera_user_cookie
      return @tessera_user_cookie if defined?(@tessera_user_cookie)

      data = cookies.encrypted[Tessera.config.user_cookie]
      @tessera_user_cookie = data.is_a?(Hash) ? data : nil
    end

    # Rails reads the CSRF secret here (6.1: `real_csrf_token(session)`, 7.1:
    # `real_csrf_token(_session = nil)`). A render action takes the cookie's secret
    # whether or not its controller declares `tessera_user`: the cookie was written by a
    # page that did.
    def real_csrf_token(*args)
      data = if tessera_render_action?
               tessera_user_cookie
             elsif tessera_user_identify && tessera_user_csrf
               tessera_user!
             end
      secret = data && data["c"]
      secret.is_a?(String) ? decode_csrf_token(secret) : super
    end
  end
end
