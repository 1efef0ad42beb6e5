-- Create a batch of tasks: each is answered from the cache, or stored PENDING with its id
-- appended to the stream. The batch is handled in order, exactly as the same submits one by
-- one would be. A client's Idempotency-Key, when given, maps to the first task it created.
-- KEYS: stream, then per task: task, cache, idempotency
-- ARGV: now, cache_ttl, result_expiry, idempotency_ttl,
--       JSON [[task_id, request, signature, scope, trace, has_idempotency_key], ..]
-- Returns per task: {'queued', task_id} | {'cached', task_id, result} | {'duplicate', first_id}
local stream, now, cache_ttl, result_expiry, idempotency_ttl =
  KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local batch = cjson.decode(ARGV[5])
local out = {}

for i, task in ipairs(batch) do
  local key, cache, idempotency = KEYS[3 * i - 1], KEYS[3 * i], KEYS[3 * i + 1]
  local task_id, request, signature, scope, trace, keyed =
    task[1], task[2], task[3], task[4], task[5], task[6] == 1
  local existing = keyed and redis.call('GET', idempotency)
  if existing then
    out[i] = {'duplicate', existing}
  else
    local hit = redis.call('GET', cache)
    if hit then
      redis.call('EXPIRE', cache, cache_ttl)
      redis.call('HSET', key, 'status', 'DONE', 'request', request, 'signature', signature,
        'scope', scope, 'cache_key', cache, 'created_at', now, 'started_at', now,
        'finished_at', now, 'result', hit, 'cached', '1', 'attempts', '0')
      out[i] = {'cached', task_id, hit}
    else
      redis.call('HSET', key, 'status', 'PENDING', 'request', request, 'signature', signature,
        'scope', scope, 'cache_key', cache, 'created_at', now, 'trace', trace,
        'attempts', '0', 'deliveries', '0')
      redis.call('XADD', stream, '*', 'task_id', task_id)
      out[i] = {'queued', task_id}
    end
    redis.call('EXPIRE', key, result_expiry)
    if keyed then
      redis.call('SET', idempotency, task_id, 'EX', idempotency_ttl)
    end
  end
end
return out
