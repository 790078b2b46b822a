# frozen_string_literal: true

module Tessera
  # `tessera_tags` for Active Record models: after every commit that creates, updates or
  # destroys a record, the tags it names are purged on every gateway.
  #
  #   class Product < ApplicationRecord
  #     tessera_tags ->(product) { ["product-#{product.id}", "shelf-#{product.shelf_id}"] }
  #   end
  #
  # After commit, not after save: a fragment rebuilt between the save and the commit
  # would read the old row and be kept. A purge that fails goes to
  # `Tessera.config.on_purge_error` (logged by default: the record is saved anyway).
  module Model
    def tessera_tags(tags = nil, &block)
      tags ||= block
      unless tags.respond_to?(:call)
        raise ArgumentError, "tessera_tags needs a lambda or block naming the record's tags"
      end

      after_commit do
        names = Array(tags.arity.zero? ? instance_exec(&tags) : tags.call(self)).compact.map(&:to_s).uniq
        begin
          Tessera.purge(tags: names) unless names.empty?
        rescue Tessera::PurgeError => e
          Tessera.config.on_purge_error.call(e, self)
        end
      end
    end
  end
end
