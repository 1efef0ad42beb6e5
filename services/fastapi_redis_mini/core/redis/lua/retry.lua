-- Run a task that ended FAILED or CANCELLED again, from the console: back to PENDING with its
-- attempts and deliveries at zero, its last error kept as `last_error`, its id appended to the
-- stream. A task in any other status is left as it is.
-- KEYS: task, stream
-- ARGV: task_id, result_expiry
-- Returns: 'queued', 'not_found', or 'not_failed' (the task is not FAILED or CANCELLED)
local t = redis.call('HMGET', KEYS[1], 'status', 'error')
if not t[1] then
  return 'not_found'
end
if t[1] ~= 'FAILED' and t[1] ~= 'CANCELLED' then
  return 'not_failed'
end
redis.call('HSET', KEYS[1], 'status', 'PENDING', 'attempts', '0', 'deliveries', '0',
  'last_error', t[2] or '')
redis.call('HDEL', KEYS[1], 'error', 'started_at', 'finished_at', 'owner', 'cancel')
redis.call('XADD', KEYS[2], '*', 'task_id', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 'queued'
