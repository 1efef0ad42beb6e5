-- Append the tasks whose retry backoff has run out to the stream again.
-- KEYS: retries, stream
-- ARGV: now, limit
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, task_id in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'task_id', task_id)
  redis.call('ZREM', KEYS[1], task_id)
end
return #due
