# frozen_string_literal: true

Rails.application.routes.draw do
  get "/login" => "sessions#new"
  post "/login" => "sessions#create"
  resources :products, only: %i[show update]

  # Render paths: the gateway's workers GET them; `rake tessera:routes` reads them.
  get "/_render/product" => "fragments#product"
  get "/_render/account" => "fragments#account"
end
