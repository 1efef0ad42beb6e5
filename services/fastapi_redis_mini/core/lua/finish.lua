-- Write the outcomes of a batch of runs and acknowledge their entries, each atomically.
-- An outcome is written only by the consumer that owns the run, and never over a final
-- status: a late or duplicate run cannot overwrite a DONE result.
-- KEYS: stream, retries, (task_i, cache_i) for each outcome
-- ARGV: group, consumer, now, cache_ttl, result_expiry, events_channel,
--       then per outcome: entry_id, task_id, outcome, payload, due_at
-- Returns per outcome: 'written', 'stale' or 'lost'
local stream, retries = KEYS[1], KEYS[2]
local group, consumer, now = ARGV[1], ARGV[2], ARGV[3]
local cache_ttl, result_expiry, channel = ARGV[4], ARGV[5], ARGV[6]
local out = {}

local n = (#KEYS - 2) / 2
for i = 1, n do
  local key, cache = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local a = 6 + (i - 1) * 5
  local entry, task_id, outcome, payload, due = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3],
    ARGV[a + 4], ARGV[a + 5]
  local t = redis.call('HMGET', key, 'status', 'owner')
  local status = t[1]
  if not status or status == 'DONE' or status == 'FAILED' or status == 'CANCELLED' then
    redis.call('XACK', stream, group, entry)
    out[i] = 'stale'
  elseif t[2] ~= consumer then
    out[i] = 'lost'
  else
    if outcome == 'DONE' then
      redis.call('HSET', key, 'status', 'DONE', 'result', payload, 'finished_at', now)
      redis.call('HDEL', key, 'error')
      redis.call('SET', cache, payload, 'EX', cache_ttl)
    elseif outcome == 'FAILED' or outcome == 'CANCELLED' then
      redis.call('HSET', key, 'status', outcome, 'error', payload, 'finished_at', now)
    else
      -- RETRY or RELEASE: back to PENDING, to be appended to the stream again when due.
      redis.call('HSET', key, 'status', 'PENDING', 'deliveries', '0')
      if outcome == 'RETRY' then
        redis.call('HSET', key, 'error', payload)
      else
        redis.call('HINCRBY', key, 'attempts', -1)
      end
      redis.call('ZADD', retries, due, task_id)
    end
    redis.call('HDEL', key, 'owner')
    redis.call('EXPIRE', key, result_expiry)
    redis.call('XACK', stream, group, entry)
    if outcome == 'DONE' or outcome == 'FAILED' or outcome == 'CANCELLED' then
      redis.call('PUBLISH', channel, task_id)
    end
    out[i] = 'written'
  end
end
return out
