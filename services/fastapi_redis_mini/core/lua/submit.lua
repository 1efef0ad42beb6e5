-- Create a batch of tasks: each is answered from the cache, or stored PENDING with its id
-- appended to the stream. The batch is handled in order, exactly as the same submits one by
-- one would be.
-- Sent again with the same ids (the client retries a call whose reply it lost), it finds each
-- task it stored and answers as the first time, so a submit is stored once, whatever the retries.
-- A client's Idempotency-Key maps to the first task it created, and never outlives that task:
-- it expires after IDEMPOTENCY_TTL or with the task, whichever comes first, so a key whose
-- task is gone is free and the next submit with it creates exactly one new task.
-- KEYS: stream, then per task: task, cache, idempotency
-- ARGV: now, cache_ttl, result_expiry, idempotency_ttl,
--       JSON [[task_id, request, signature, scope, trace, idempotency], ..]
--       where idempotency is 0 (no key), 1 (a key), or the id of a task the caller found gone
--       that the key may still point at (then the key is taken over for this task)
-- Returns per task: {'queued', task_id} | {'cached', task_id, result} | {'duplicate', first_id}
local stream, now, cache_ttl, result_expiry, idempotency_ttl =
  KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local batch = cjson.decode(ARGV[5])
local out = {}

for i, task in ipairs(batch) do
  local key, cache, idempotency = KEYS[3 * i - 1], KEYS[3 * i], KEYS[3 * i + 1]
  local task_id, request, signature, scope, trace, keyed =
    task[1], task[2], task[3], task[4], task[5], task[6]
  local existing = keyed ~= 0 and redis.call('GET', idempotency)
  if existing == keyed then
    existing = false
  end
  local stored = redis.call('HMGET', key, 'status', 'cached', 'result')
  if stored[1] then
    -- This very submit ran before: answer as then, change nothing.
    if stored[2] == '1' then
      out[i] = {'cached', task_id, stored[3]}
    else
      out[i] = {'queued', task_id}
    end
  elseif existing then
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
    if keyed ~= 0 then
      -- Set in the same instant as the task's TTL, and a task's TTL is only ever extended.
      redis.call('SET', idempotency, task_id, 'EX', math.min(idempotency_ttl, result_expiry))
    end
  end
end
return out
