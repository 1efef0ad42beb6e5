-- Shared by the bench scripts: optional pacing, an optional request cap, a JSON summary.
-- WRK_DELAY_MS   pause each connection takes before its next request (paced runs)
-- WRK_MAX_REQUESTS  per-thread cap on responses, after which the thread stops

local common = {}

local delay_ms = tonumber(os.getenv("WRK_DELAY_MS") or "")
local max_requests = tonumber(os.getenv("WRK_MAX_REQUESTS") or "")
local responses = 0

if delay_ms then
   delay = function()
      return delay_ms
   end
end

if max_requests then
   response = function(status, headers, body)
      responses = responses + 1
      if responses >= max_requests then
         wrk.thread:stop()
      end
   end
end

done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      '{"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d, '
         .. '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, '
         .. '"p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end

return common
