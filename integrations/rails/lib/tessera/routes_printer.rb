# frozen_string_literal: true

module Tessera
  # Writes the gateway's `[[fragment]]` routes from the render actions the app declared
  # (`tessera_render`), each `render` path read from the app's own routes, so routes are
  # declared once, in the app.
  module RoutesPrinter
    module_function

    def toml(app = Rails.application, routes = Tessera.routes)
      tables = routes.values.sort_by(&:name).map { |route| route.to_toml(render_path(app, route)) }
      header = "# [[fragment]] routes of #{app.class.name}, from its tessera_render actions " \
               "(rake tessera:routes).\n"
      header + (tables.empty? ? "# (no tessera_render actions declared)\n" : "\n#{tables.join("\n\n")}\n")
    end

    # The path of the GET route to the route's action. The workers add the params as a
    # query, so the path must be static.
    def render_path(app, route)
      match = app.routes.routes.find do |r|
        r.defaults[:controller] == route.controller_path && r.defaults[:action] == route.action &&
          (r.verb.to_s.empty? || r.verb.to_s.split("|").include?("GET"))
      end
      if match.nil?
        raise Error, "tessera_render #{route.name}: no GET route leads to " \
                     "#{route.controller_path}##{route.action}; add one to config/routes.rb"
      end

      path = match.path.spec.to_s.sub(/\(\.:format\)\z/, "")
      if path.match?(/[:*()]/)
        raise Error, "tessera_render #{route.name}: its route #{path} has dynamic segments; " \
                     "pass those values as params instead"
      end
      path
    end
  end
end
