-- A client's cancel: a PENDING task becomes CANCELLED at once (its entry is acknowledged by
-- the worker that later receives it); a RUNNING task is flagged for its worker to stop.
-- KEYS: task, the unfinished set of the task's API key
-- ARGV: scope, now, events_channel, task_id, publish command (PUBLISH, or SPUBLISH on a cluster)
local t = redis.call('HMGET', KEYS[1], 'status', 'scope')
if not t[1] or (t[2] or '') ~= ARGV[1] then
  return 'not_found'
end
if t[1] == 'PENDING' then
  redis.call('HSET', KEYS[1], 'status', 'CANCELLED', 'finished_at', ARGV[2],
    'error', 'cancelled before it started', 'cancel', '1')
  redis.call('ZREM', KEYS[2], ARGV[4])
  redis.call(ARGV[5], ARGV[3], ARGV[4])
  return 'cancelled'
end
if t[1] == 'RUNNING' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  return 'requested'
end
return 'final'
