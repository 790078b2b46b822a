# frozen_string_literal: true

require_relative "test_helper"

class MarkupTest < Minitest::Test
  M = Tessera::Markup

  def test_capability_names_esi
    assert M.esi_capable?('tessera="ESI/1.0"')
    assert M.esi_capable?('cdn="ESI-Inline/1.0 ESI/1.0", tessera="x"')
    refute M.esi_capable?('tessera="ESI/1.01"')
    refute M.esi_capable?('tessera="XESI/1.0"')
    refute M.esi_capable?("")
    refute M.esi_capable?(nil)
  end

  def test_src_encodes_params_and_repeats_arrays
    assert_equal "/fragments/recs", M.src("/fragments/", :recs)
    assert_equal "/fragments/recs?user_id=7&q=a+b&t=x&t=%26%3D", M.src("/fragments/", "recs", user_id: 7, q: "a b", t: ["x", "&="])
    assert_equal "/f/x?a=", M.src("/f/", "x", a: nil)
  end

  def test_src_refuses_names_the_gateway_refuses
    assert_raises(ArgumentError) { M.src("/fragments/", "Recs") }
    assert_raises(ArgumentError) { M.src("/fragments/", "a/b") }
    assert_raises(ArgumentError) { M.src("/fragments/", "x" * 65) }
  end

  def test_markup_escapes_the_src
    assert_equal '<esi:include src="/fragments/x?a=1&amp;b=%22"/>', M.esi_include('/fragments/x?a=1&b=%22')
    assert_equal '<div class="tessera-fragment" data-tessera-src="/f/x?a=1&amp;b=2">L<template class="tessera-fallback">F</template></div>',
                 M.placeholder("/f/x?a=1&b=2", "L", "F")
  end
end

class RouteTest < Minitest::Test
  def setup
    Tessera.reset_config!
  end

  def test_toml_of_a_route
    route = Tessera::Route.new(:cart, controller_path: "f", action: "cart", params: %i[a b], vary: [:user, "header:accept-language"],
                                      fresh: 90, stale: 600.0, refresh_ahead: "15s", failed_ttl: 2.5, shareable: false,
                                      max_attempts: 3, placeholder: %(<p class="x">\\…\n</p>), queue: "tessera.build.slow")
    assert_equal <<~TOML.chomp, route.to_toml("/_render/cart")
      [[fragment]]
      name = "cart"
      render = "/_render/cart"
      params = ["a", "b"]
      vary = ["cookie:tessera_user", "header:accept-language"]
      shareable = false
      max_attempts = 3
      placeholder = "<p class=\\"x\\">\\\\…\\u000A</p>"
      queue = "tessera.build.slow"
      fresh = "90s"
      stale = "600000ms"
      refresh_ahead = "15s"
      failed_ttl = "2500ms"
    TOML
    assert_equal 90, route.max_age
    assert route.per_user?
  end

  def test_durations_of_active_support
    route = Tessera::Route.new(:x, controller_path: "f", action: "x", fresh: 2.minutes)
    assert_equal 120, route.max_age
    assert_includes route.to_toml("/r"), 'fresh = "120s"'
    assert_equal 600, Tessera::Route.new(:x, controller_path: "f", action: "x", fresh: "10m").max_age
    assert_equal 60, Tessera::Route.new(:x, controller_path: "f", action: "x").max_age
  end

  def test_user_cookie_name_follows_the_config
    Tessera.config.user_cookie = "visitor"
    route = Tessera::Route.new(:x, controller_path: "f", action: "x", vary: :user)
    assert_equal ["cookie:visitor"], route.vary
  end

  def test_bad_declarations_are_refused
    assert_raises(ArgumentError) { Tessera::Route.new(:x, controller_path: "f", action: "x", fresh: "soon") }
    assert_raises(ArgumentError) { Tessera::Route.new(:x, controller_path: "f", action: "x", vary: "session") }
    assert_raises(ArgumentError) { Tessera::Route.new(:x, controller_path: "f", action: "x", ttl: 3) }
    assert_raises(ArgumentError) { Tessera::Route.new(:X, controller_path: "f", action: "x") }
  end
end
