-- Create a task: answer from the cache, or store it PENDING and append its id to the stream.
-- A client's Idempotency-Key, when given, maps to the first task it created.
-- KEYS: task, cache, stream, idempotency
-- ARGV: task_id, request, signature, scope, now, traceparent, cache_ttl, result_expiry,
--       idempotency_ttl (0 when the client sent no key)
local task_id = ARGV[1]
local use_idempotency = tonumber(ARGV[9]) > 0

if use_idempotency then
  local existing = redis.call('GET', KEYS[4])
  if existing then
    return {'duplicate', existing}
  end
end

local hit = redis.call('GET', KEYS[2])
if hit then
  redis.call('EXPIRE', KEYS[2], ARGV[7])
  redis.call('HSET', KEYS[1], 'status', 'DONE', 'request', ARGV[2], 'signature', ARGV[3],
    'scope', ARGV[4], 'created_at', ARGV[5], 'started_at', ARGV[5], 'finished_at', ARGV[5],
    'result', hit, 'cached', '1', 'attempts', '0')
  redis.call('EXPIRE', KEYS[1], ARGV[8])
  if use_idempotency then
    redis.call('SET', KEYS[4], task_id, 'EX', ARGV[9])
  end
  return {'cached', task_id, hit}
end

redis.call('HSET', KEYS[1], 'status', 'PENDING', 'request', ARGV[2], 'signature', ARGV[3],
  'scope', ARGV[4], 'created_at', ARGV[5], 'trace', ARGV[6], 'attempts', '0', 'deliveries', '0')
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('XADD', KEYS[3], '*', 'task_id', task_id)
if use_idempotency then
  redis.call('SET', KEYS[4], task_id, 'EX', ARGV[9])
end
return {'queued', task_id}
