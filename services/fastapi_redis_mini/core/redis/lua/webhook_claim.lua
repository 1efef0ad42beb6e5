-- Take up to `count` due webhook deliveries for one attempt each. A message taken is due again
-- after `lease` seconds, so one whose sender dies mid-attempt is taken again by another
-- sender then: deliveries are at-least-once. The attempt is counted here, before it is made,
-- so a message that kills its senders still runs out of attempts.
-- KEYS: due, messages
-- ARGV: now, lease, count
-- Returns: flat [message, attempt, last error, ..] for each message taken
local due, messages = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local m = redis.call('HMGET', messages, id, id .. ':error')
  if not m[1] then
    redis.call('ZREM', due, id)  -- settled meanwhile
  else
    local attempt = redis.call('HINCRBY', messages, id .. ':attempts', 1)
    redis.call('ZADD', due, now + tonumber(ARGV[2]), id)
    out[#out + 1] = m[1]
    out[#out + 1] = attempt
    out[#out + 1] = m[2] or ''
  end
end
return out
