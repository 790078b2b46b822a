# frozen_string_literal: true

class ApplicationController < ActionController::Base
  tessera_user { session[:user] }
end
