# frozen_string_literal: true

module Tessera
  # Adds `Surrogate-Control: content="ESI/1.0"` to answers that wrote an
  # `<esi:include>` (Tessera::Helper), and to no other: the gateway composes only answers
  # that ask, so a page that merely shows user input looking like ESI is left alone.
  class Middleware
    def initialize(app)
      @app = app
    end

    def call(env)
      status, headers, body = @app.call(env)
      headers["Surrogate-Control"] = 'content="ESI/1.0"' if env[Helper::ESI_WRITTEN]
      [status, headers, body]
    end
  end
end
