# frozen_string_literal: true

# Render actions: the gateway's workers GET them, never a browser.
class FragmentsController < ApplicationController
  include Tessera::Render

  tessera_render :product, params: [:id], fresh: 1.minute, stale: 10.minutes
  tessera_render :account, params: [:product_id], vary: :user, fresh: 1.minute, stale: 10.minutes

  def product
    @product = Product.find(params[:id])
    tessera_tags "product-#{@product.id}"
  end

  # Per user: who is signed in, and a form that renames the product (a CSRF token, so
  # the route varies on the user cookie, which holds the secret the POST is checked
  # against).
  def account
    @user = tessera_user_id
    @product = Product.find(params[:product_id])
  end
end
