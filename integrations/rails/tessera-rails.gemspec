# frozen_string_literal: true

require_relative "lib/tessera/version"

Gem::Specification.new do |s|
  s.name = "tessera-rails"
  s.version = Tessera::VERSION
  s.summary = "Rails helpers for the Tessera fragment-cache gateway"
  s.description = "ESI includes and client.js placeholders, render actions with " \
                  "shareable caching and tags, purges over the admin API, and the " \
                  "gateway's [[fragment]] routes printed from the app."
  s.authors = ["Tessera contributors"]
  s.license = "MIT"
  s.files = Dir["lib/**/*.rb", "lib/tasks/*.rake", "README.md"]
  s.require_paths = ["lib"]
  s.required_ruby_version = ">= 2.7"
  s.add_dependency "rails", ">= 6.1"
end
