# frozen_string_literal: true

# Bundler requires a gem by its name; the library is `Tessera`.
require "tessera"
