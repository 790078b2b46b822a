# frozen_string_literal: true

# A small Rails app in memory (pages, render actions, a model), and a fake admin API,
# for the gem's own tests. The end-to-end test with a real gateway is test/e2e.
ENV["DATABASE_URL"] = "sqlite3::memory:"
ENV["RAILS_ENV"] = "test"
%w[TESSERA_ADMIN_URL TESSERA_ADMIN_TOKEN TESSERA_RENDER_TOKEN].each { |name| ENV.delete(name) }

require "minitest/autorun"
require "socket"
require "json"
require "rails"
require "active_record/railtie"
require "action_controller/railtie"
require "action_view/railtie"
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "tessera-rails"

class TestApp < Rails::Application
  config.load_defaults 6.1
  config.root = __dir__
  config.eager_load = false
  config.secret_key_base = "t" * 64
  config.hosts.clear
  config.logger = Logger.new(nil)
  config.active_support.deprecation = :silence
  config.session_store :cookie_store, key: "_test_session"
  config.action_controller.allow_forgery_protection = true
end
TestApp.initialize!

ActiveRecord::Schema.verbose = false
ActiveRecord::Schema.define do
  create_table(:products) { |t| t.string :name }
end

class Product < ActiveRecord::Base
  tessera_tags ->(product) { ["product-#{product.id}", "products"] }
end

class PagesController < ActionController::Base
  tessera_user { session[:user_id] }

  def show
    render inline: <<~ERB
      <main><%= tessera_fragment :recs, limit: 5, tag: ["a b", "c&d"] %>
      <%= tessera_fragment :cart, placeholder: "<b>wait</b>" do %>no cart<% end %></main>
    ERB
  end

  def plain
    render inline: "<p>no fragments, user <%= session[:user_id].inspect %></p>"
  end

  def token
    render plain: form_authenticity_token
  end

  def login
    session[:user_id] = params[:user]
    head :ok
  end

  def update
    head :ok
  end
end

# A controller of an app that does not use tessera_user.
class OtherController < ActionController::Base
  def show
    render inline: "<%= tessera_fragment :recs %><%= tessera_fragment :recs %>"
  end
end

class FragmentsController < ActionController::Base
  include Tessera::Render
  tessera_render :recs, params: [:limit], fresh: 30, stale: 600
  tessera_render :cart, vary: :user, fresh: "10s", placeholder: "<p>…</p>"
  tessera_render :plain_one, action: :plain

  def recs
    tessera_tags "shelf-1", "product-#{params[:limit]}"
    tessera_tags "shelf-1"
    render plain: "recs #{params[:limit]}"
  end

  def cart
    render inline: "cart of <%= controller.tessera_user_id.inspect %>:<%= form_authenticity_token %>"
  end

  def plain
    render plain: "plain"
  end
end

# An app whose controllers all require a login: the token is checked before that.
class LoginRequiredController < ActionController::Base
  before_action { head :forbidden }
end

class GuardedFragmentsController < LoginRequiredController
  include Tessera::Render
  tessera_render :guarded

  def guarded
    render plain: "guarded"
  end
end

TestApp.routes.draw do
  get "/_render/guarded" => "guarded_fragments#guarded"
  get "/page" => "pages#show"
  get "/plain" => "pages#plain"
  get "/token" => "pages#token"
  post "/login" => "pages#login"
  post "/update" => "pages#update"
  get "/other" => "other#show"
  get "/_render/recs" => "fragments#recs"
  get "/_render/cart" => "fragments#cart"
  get "/_render/plain" => "fragments#plain"
end

# An admin listener that records each request and answers what the test says.
class FakeAdmin
  Request = Struct.new(:verb, :path, :headers)
  attr_reader :requests, :url
  attr_accessor :status

  def initialize
    @server = TCPServer.new("127.0.0.1", 0)
    @url = "http://127.0.0.1:#{@server.addr[1]}"
    @requests = Queue.new
    @status = 200
    @thread = Thread.new { loop { serve(@server.accept) } }
  end

  def stop
    @thread.kill
    @server.close
  end

  def taken
    out = []
    out << @requests.pop until @requests.empty?
    out
  end

  private

  def serve(socket)
    method, path = socket.gets.split
    headers = {}
    while (line = socket.gets) && line != "\r\n"
      name, value = line.split(":", 2)
      headers[name.downcase] = value.strip
    end
    @requests << Request.new(method, path, headers)
    body = JSON.generate(path: path)
    socket.write("HTTP/1.1 #{status} X\r\ncontent-type: application/json\r\n" \
                 "content-length: #{body.bytesize}\r\nconnection: close\r\n\r\n#{body}")
  ensure
    socket&.close
  end
end
