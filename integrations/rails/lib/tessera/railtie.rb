# frozen_string_literal: true

require "rails/railtie"
require "tessera/helper"
require "tessera/middleware"
require "tessera/model"
require "tessera/render"
require "tessera/routes_printer"
require "tessera/user"

module Tessera
  # Wires the gem into an app: the helper into views, `tessera_user` into controllers,
  # `tessera_tags` into models, the middleware, and `rake tessera:routes`.
  class Railtie < Rails::Railtie
    initializer "tessera.middleware" do |app|
      app.middleware.use Tessera::Middleware
    end

    initializer "tessera.hooks" do
      ActiveSupport.on_load(:action_view) { include Tessera::Helper }
      ActiveSupport.on_load(:action_controller_base) { include Tessera::User }
      ActiveSupport.on_load(:active_record) { extend Tessera::Model }
    end

    rake_tasks do
      load File.expand_path("../tasks/tessera.rake", __dir__)
    end
  end
end
