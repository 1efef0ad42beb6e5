-- Settle one attempt of a webhook delivery taken by webhook_claim.lua. A delivered message
-- leaves, whoever holds it now; any other verdict applies only while the message is still the
-- caller's (its attempt count unchanged), so a sender whose lease ran out cannot reschedule
-- or dead-letter a message that another sender has taken since.
-- KEYS: due, messages, dead-letter stream
-- ARGV: id, attempt, verdict ('delivered', 'retry', 'release' or 'dead'), due_at (retry),
--       error, now, dead_letter_maxlen
-- Returns: 'settled', 'gone' (already settled) or 'taken' (another sender holds it now)
local due, messages, dead = KEYS[1], KEYS[2], KEYS[3]
local id, verdict = ARGV[1], ARGV[3]
local m = redis.call('HMGET', messages, id, id .. ':attempts')
if not m[1] then
  return 'gone'
end
local function forget()
  redis.call('ZREM', due, id)
  redis.call('HDEL', messages, id, id .. ':attempts', id .. ':error')
end
if verdict == 'delivered' then
  forget()
  return 'settled'
end
if tonumber(m[2]) ~= tonumber(ARGV[2]) then
  return 'taken'
end
if verdict == 'retry' then
  redis.call('HSET', messages, id .. ':error', ARGV[5])
  redis.call('ZADD', due, ARGV[4], id)
elseif verdict == 'release' then
  -- A sender stopping mid-attempt: the attempt does not count, and the message is due now.
  redis.call('HINCRBY', messages, id .. ':attempts', -1)
  redis.call('ZADD', due, ARGV[6], id)
else
  local message = cjson.decode(m[1])
  redis.call('XADD', dead, 'MAXLEN', ARGV[7], '*', 'task_id', message.task_id,
    'message_id', id, 'url', message.url, 'event', message.event, 'attempts', m[2],
    'error', ARGV[5], 'failed_at', ARGV[6])
  forget()
end
return 'settled'
