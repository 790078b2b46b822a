# frozen_string_literal: true

require "erb"
require "json"
require "net/http"
require "uri"

module Tessera
  # A purge the gateway refused, or could not be asked for.
  class PurgeError < Error
    # The HTTP status, nil when no answer came.
    attr_reader :status

    def initialize(message, status: nil)
      super(message)
      @status = status
    end
  end

  # The gateway's admin API (`gateway.admin_listen`): purges reach every gateway from
  # whichever one is asked.
  class Admin
    def initialize(config = Tessera.config)
      @config = config
    end

    # `DELETE /tags/{tag}`: every fragment whose render answer carried the tag.
    def purge_tag(tag)
      delete("/tags/#{ERB::Util.url_encode(tag.to_s)}")
    end

    # `DELETE /routes/{name}`: every fragment of the route.
    def purge_route(name)
      delete("/routes/#{ERB::Util.url_encode(name.to_s)}")
    end

    # `DELETE /fragments/{name}?{params}`: one fragment. A route with `vary` needs the
    # same cookies and headers the fragment was built for.
    def purge_fragment(name, params = {}, cookies: {}, headers: {})
      path = Markup.src("/fragments/", name, params)
      extra = headers.to_h.transform_keys(&:to_s)
      unless cookies.empty?
        extra["Cookie"] = cookies.map { |k, v| "#{k}=#{ERB::Util.url_encode(v.to_s)}" }.join("; ")
      end
      delete(path, extra)
    end

    private

    def delete(path, headers = {})
      uri = URI.parse(@config.admin_url.to_s.chomp("/") + path)
      request = Net::HTTP::Delete.new(uri.request_uri, headers)
      request["Authorization"] = "Bearer #{@config.admin_token}" if @config.admin_token
      request["Accept"] = "application/json"
      response = send_request(uri, request)
      unless response.is_a?(Net::HTTPSuccess)
        raise PurgeError.new("DELETE #{path}: the gateway answered #{response.code}: #{response.body.to_s[0, 300]}",
                             status: response.code.to_i)
      end

      JSON.parse(response.body)
    rescue JSON::ParserError => e
      raise PurgeError.new("DELETE #{path}: the answer is not JSON (#{e.message})", status: response&.code.to_i)
    end

    def send_request(uri, request)
      timeout = @config.admin_timeout
      Net::HTTP.start(uri.host, uri.port, use_ssl: uri.scheme == "https",
                                          open_timeout: timeout, read_timeout: timeout,
                                          write_timeout: timeout) do |http|
        http.request(request)
      end
    rescue SystemCallError, IOError, Timeout::Error, SocketError, OpenSSL::SSL::SSLError => e
      raise PurgeError, "DELETE #{uri.path}: cannot reach the gateway's admin API at " \
                        "#{@config.admin_url} (#{e.class}: #{e.message})"
    end
  end
end
