# frozen_string_literal: true

require "erb"

module Tessera
  # `tessera_fragment`, the view helper that puts a fragment in a page.
  module Helper
    # Marks the request as having written an include (Tessera::Middleware reads it).
    ESI_WRITTEN = "tessera.esi"
    CLIENT_WRITTEN = "tessera.client_js"

    # The fragment `name` with `params` (the route's allow-listed query params):
    #
    #   <%= tessera_fragment :recommendations, limit: 5 %>
    #   <%= tessera_fragment :cart, placeholder: "Loading your cart…" do %>
    #     Your cart is unavailable right now.
    #   <% end %>
    #
    # Through the gateway (the request's `Surrogate-Capability` names ESI/1.0) this is an
    # `<esi:include>`, filled before the page leaves the gateway. Otherwise it is the
    # placeholder /_tessera/client.js fills from the browser, with the script once per
    # page; so is a per-user fragment (`vary`, or a route not declared yet in this
    # process) when this request has just (re)written the per-user cookie: the browser
    # does not hold it yet, so the gateway would compose the include for the old one.
    # Shared fragments are composed even then, so a client that keeps no cookies (a
    # crawler) still gets them in the page. The block is the fallback shown when the
    # fragment cannot be had; `placeholder` (HTML, escaped unless html_safe) is shown
    # while it loads.
    def tessera_fragment(name, placeholder: nil, **params, &fallback)
      src = Markup.src(Tessera.config.fragment_prefix, name, params)
      user_changed = tessera_user_changed_for?(name) # also sets the cookie the fragment needs
      if Markup.esi_capable?(request.headers["Surrogate-Capability"]) && !user_changed
        request.env[ESI_WRITTEN] = true
        return Markup.esi_include(src).html_safe
      end

      html = Markup.placeholder(
        src,
        placeholder.nil? ? Markup::PLACEHOLDER : ERB::Util.html_escape(placeholder),
        fallback ? capture(&fallback).to_s.strip : Markup::FALLBACK
      )
      unless request.env[CLIENT_WRITTEN]
        request.env[CLIENT_WRITTEN] = true
        html += Markup::CLIENT_SCRIPT
      end
      html.html_safe
    end

    private

    def tessera_user_changed_for?(name)
      route = Tessera.routes[name.to_s]
      return false if route && !route.per_user?

      controller.respond_to?(:tessera_user_changed?, true) && controller.send(:tessera_user_changed?)
    end
  end
end
