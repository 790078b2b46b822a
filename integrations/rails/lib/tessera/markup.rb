# frozen_string_literal: true

require "cgi"
require "uri"

module Tessera
  # What a page writes for a fragment, as plain functions of their inputs.
  module Markup
    # Route names the gateway accepts (`[[fragment]] name`).
    NAME = /\A[a-z0-9_-]{1,64}\z/.freeze
    # The gateway's own defaults for a route's `placeholder` and `fallback`, so a page
    # that was not composed looks like one whose fragment is still being built.
    PLACEHOLDER = '<div class="tessera-loading">Loading…</div>'
    FALLBACK = '<div class="tessera-unavailable">This content is unavailable right now.</div>'
    CLIENT_SCRIPT = '<script src="/_tessera/client.js" defer></script>'

    module_function

    # Whether a `Surrogate-Capability` header value (`tessera="ESI/1.0"`, several
    # devices comma-separated) names ESI/1.0: only then is an include composed.
    def esi_capable?(capability)
      return false if capability.nil?

      capability.to_s.split(/[\s,;="]+/).include?("ESI/1.0")
    end

    # The fragment's URL: `{prefix}{name}?{params}`. Array values repeat the parameter;
    # nil is the empty string. The gateway keeps only the route's allow-listed params.
    def src(prefix, name, params = {})
      name = name.to_s
      raise ArgumentError, "fragment name #{name.inspect} is not [a-z0-9_-], 1-64 bytes" unless NAME.match?(name)

      pairs = params.flat_map do |key, value|
        Array(value.nil? ? "" : value).map { |v| [key.to_s, v.to_s] }
      end
      query = URI.encode_www_form(pairs)
      query.empty? ? "#{prefix}#{name}" : "#{prefix}#{name}?#{query}"
    end

    # The include the gateway fills.
    def esi_include(src)
      %(<esi:include src="#{CGI.escapeHTML(src)}"/>)
    end

    # What the gateway itself writes for a fragment it has not built yet, which
    # /_tessera/client.js fills. `placeholder` and `fallback` are HTML.
    def placeholder(src, placeholder = PLACEHOLDER, fallback = FALLBACK)
      %(<div class="tessera-fragment" data-tessera-src="#{CGI.escapeHTML(src)}">) +
        %(#{placeholder}<template class="tessera-fallback">#{fallback}</template></div>)
    end
  end
end
