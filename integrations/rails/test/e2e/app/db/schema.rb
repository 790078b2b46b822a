# frozen_string_literal: true

ActiveRecord::Schema.define do
  create_table :products, if_not_exists: true do |t|
    t.string :name, null: false
    t.integer :price_cents, null: false, default: 0
  end
end
