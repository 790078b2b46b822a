# frozen_string_literal: true

namespace :tessera do
  desc "Print the gateway's [[fragment]] routes from the app's tessera_render actions"
  task routes: :environment do
    require "tessera/routes_printer"
    Rails.application.eager_load!
    $stdout.write(Tessera::RoutesPrinter.toml)
  end
end
