# frozen_string_literal: true

class ProductsController < ApplicationController
  def show
    @product = Product.find(params[:id])
  end

  def update
    product = Product.find(params[:id])
    product.update!(params.require(:product).permit(:name))
    redirect_to product_path(product)
  end
end
