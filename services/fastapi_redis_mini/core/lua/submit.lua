-- Create a task: answer from the cache, or store it PENDING and append its id to the stream.
-- A client's Idempotency-Key, when given, maps to the first task it created.
-- KEYS: task, cache, stream, idempotency
-- ARGV: task_id, request, signature, scope, cache_key, now, traceparent, cache_ttl,
--       result_expiry, idempotency_ttl (0 when the client sent no key)
local task_id, request, signature, scope, cache_key, now, trace =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local cache_ttl, result_expiry, idempotency_ttl = ARGV[8], ARGV[9], tonumber(ARGV[10])

if idempotency_ttl > 0 then
  local existing = redis.call('GET', KEYS[4])
  if existing then
    return {'duplicate', existing}
  end
end

local hit = redis.call('GET', KEYS[2])
if hit then
  redis.call('EXPIRE', KEYS[2], cache_ttl)
  redis.call('HSET', KEYS[1], 'status', 'DONE', 'request', request, 'signature', signature,
    'scope', scope, 'cache_key', cache_key, 'created_at', now, 'started_at', now,
    'finished_at', now, 'result', hit, 'cached', '1', 'attempts', '0')
else
  redis.call('HSET', KEYS[1], 'status', 'PENDING', 'request', request, 'signature', signature,
    'scope', scope, 'cache_key', cache_key, 'created_at', now, 'trace', trace,
    'attempts', '0', 'deliveries', '0')
  redis.call('XADD', KEYS[3], '*', 'task_id', task_id)
end
redis.call('EXPIRE', KEYS[1], result_expiry)
if idempotency_ttl > 0 then
  redis.call('SET', KEYS[4], task_id, 'EX', idempotency_ttl)
end
if hit then
  return {'cached', task_id, hit}
end
return {'queued', task_id}
