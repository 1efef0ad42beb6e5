-- Write the outcomes of a batch of runs and acknowledge their entries, in one atomic step.
-- An outcome is written only by the consumer that owns the run, and never over a final
-- status: a late or duplicate run cannot overwrite a DONE result.
-- A final outcome also takes the task off its API key's set of unfinished tasks, if the submit
-- put it there (the task's `counted` field): quotas may be set on the api alone.
-- The common path (DONE) costs four commands a task: HMGET, HSET, SET and EXPIRE. The owner is
-- blanked in the same HSET rather than deleted, and an error left by an earlier attempt is
-- deleted only when there is one; the server's clock is read once per batch.
-- With recent_cap, the ids of the tasks that ended go to one capped list per final status, and
-- a ten-second bucket counts them: one LPUSH and one HINCRBY per status in the batch, and one
-- EXPIRE (three commands for a batch that is all DONE).
-- A final outcome of a task with a `completed` webhook records its delivery in the same step
-- (see webhook_claim.lua), so no outcome is written without its delivery, however the worker
-- ends. A batch without webhooks neither names those keys nor runs a command more.
-- KEYS: stream, retries, (task_i, cache_i, unfinished_i) for each outcome[, then with
--       recent_cap: the done, failed and cancelled lists and the bucket's counts hash][, then
--       with webhooks: the deliveries' due set and messages hash]
-- ARGV: group, consumer, now, cache_ttl, events_channel, result_expiry,
--       JSON [[entry_id, task_id, outcome, payload, due_at[, message_id, message]], ..],
--       publish command, recent_cap (absent or 0: no lists, no counts), counts_ttl,
--       webhooks (1: KEYS end with the webhook keys, and an outcome with a message records it)
-- Returns per outcome: 'written', 'stale' or 'lost'
local stream, retries = KEYS[1], KEYS[2]
local group, consumer, now, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
local cache_ttl = tonumber(ARGV[4])
local result_expiry = tonumber(ARGV[6])
local batch = cjson.decode(ARGV[7])
local publish = ARGV[8]
local recent_cap, counts_ttl = tonumber(ARGV[9] or '0'), ARGV[10]
local last = #KEYS  -- the last key before the webhook keys
local webhooks_due, webhook_messages = nil, nil
if ARGV[11] == '1' then
  webhooks_due, webhook_messages = KEYS[last - 1], KEYS[last]
  last = last - 2
end
local out, acks, finished = {}, {}, {}
local ended = {DONE = {}, FAILED = {}, CANCELLED = {}}
local expires_at = nil

for i, item in ipairs(batch) do
  local key, cache, unfinished = KEYS[3 * i], KEYS[3 * i + 1], KEYS[3 * i + 2]
  local entry, task_id, outcome, payload, due = item[1], item[2], item[3], item[4], item[5]
  local t = redis.call('HMGET', key, 'status', 'owner', 'error', 'counted')
  local status = t[1]
  if not status or status == 'DONE' or status == 'FAILED' or status == 'CANCELLED' or
    status == 'EXPIRED' then
    acks[#acks + 1] = entry
    out[i] = 'stale'
  elseif t[2] ~= consumer then
    out[i] = 'lost'
  else
    if outcome == 'DONE' then
      redis.call('HSET', key, 'status', 'DONE', 'result', payload, 'finished_at', now,
        'owner', '')
      if t[3] then
        redis.call('HDEL', key, 'error')
      end
      -- The cached result names its task and when that task expires, and never outlives
      -- it: a cache hit answers with this task's id, which GET must still find.
      if not expires_at then
        expires_at = tonumber(redis.call('TIME')[1]) + result_expiry
      end
      redis.call('SET', cache, task_id .. ':' .. expires_at .. ':' .. payload,
        'EX', math.min(cache_ttl, result_expiry))
      if t[4] then
        redis.call('ZREM', unfinished, task_id)
      end
      finished[#finished + 1] = task_id
      ended.DONE[#ended.DONE + 1] = task_id
      if item[6] and webhooks_due then
        redis.call('HSET', webhook_messages, item[6], item[7])
        redis.call('ZADD', webhooks_due, now, item[6])
      end
    elseif outcome == 'FAILED' or outcome == 'CANCELLED' then
      redis.call('HSET', key, 'status', outcome, 'error', payload, 'finished_at', now,
        'owner', '')
      if t[4] then
        redis.call('ZREM', unfinished, task_id)
      end
      finished[#finished + 1] = task_id
      ended[outcome][#ended[outcome] + 1] = task_id
      if item[6] and webhooks_due then
        redis.call('HSET', webhook_messages, item[6], item[7])
        redis.call('ZADD', webhooks_due, now, item[6])
      end
    else
      -- RETRY or RELEASE: back to PENDING, to be appended to the stream again when due.
      -- A retry ends an attempt properly, so the delivery count starts again; a release
      -- (a worker stopping mid-task) takes back the delivery and the attempt it counted.
      redis.call('HSET', key, 'status', 'PENDING')
      redis.call('HDEL', key, 'owner')
      if outcome == 'RETRY' then
        redis.call('HSET', key, 'error', payload, 'deliveries', '0')
      else
        redis.call('HINCRBY', key, 'attempts', -1)
        redis.call('HINCRBY', key, 'deliveries', -1)
      end
      redis.call('ZADD', retries, due, task_id)
    end
    -- The task is kept RESULT_EXPIRY from its last change, not from its submission.
    redis.call('EXPIRE', key, result_expiry)
    acks[#acks + 1] = entry
    out[i] = 'written'
  end
end
if #acks > 0 then
  redis.call('XACK', stream, group, unpack(acks))
end
if #finished > 0 and recent_cap > 0 then
  local n = last
  local lists = {DONE = KEYS[n - 3], FAILED = KEYS[n - 2], CANCELLED = KEYS[n - 1]}
  for status, ids in pairs(ended) do
    if #ids > 0 then
      local length = 0
      for first = 1, #ids, 1000 do  -- unpack() is limited to a few thousand values
        length = redis.call('LPUSH', lists[status], unpack(ids, first, math.min(first + 999, #ids)))
      end
      if length > recent_cap + math.ceil(recent_cap / 10) then
        redis.call('LTRIM', lists[status], 0, recent_cap - 1)
      end
      redis.call('HINCRBY', KEYS[n], status, #ids)
    end
  end
  redis.call('EXPIRE', KEYS[n], counts_ttl)
end
if #finished > 0 then
  -- One message per batch: long-polls split it on spaces.
  redis.call(publish, channel, table.concat(finished, ' '))
end
return out
