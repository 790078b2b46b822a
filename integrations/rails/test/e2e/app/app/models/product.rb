# frozen_string_literal: true

class Product < ApplicationRecord
  # Every fragment that shows the product tags itself so (FragmentsController#product).
  tessera_tags ->(product) { ["product-#{product.id}"] }
end
