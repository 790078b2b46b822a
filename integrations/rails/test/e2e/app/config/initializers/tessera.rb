# frozen_string_literal: true

# TESSERA_ADMIN_URL, TESSERA_ADMIN_TOKEN and TESSERA_RENDER_TOKEN come from the
# environment; set anything else here.
Tessera.configure do |c|
  c.fragment_prefix = "/fragments/"
end
