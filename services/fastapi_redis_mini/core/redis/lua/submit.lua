-- Create a batch of tasks: each is answered from the cache, or stored PENDING with its id
-- appended to the stream. The batch is handled in order, exactly as the same submits one by
-- one would be.
-- Sent again with the same ids (the client retries a call whose reply it lost), it finds each
-- task it stored and answers as the first time, so a submit is stored once, whatever the retries.
-- A client's Idempotency-Key maps to the first task it created and that task's request
-- signature, "task_id:signature"; the key sent again with another body is refused
-- ('idempotency_key_reused'), as Stripe does, instead of silently answering the first task.
-- The key never outlives its task:
-- it expires after IDEMPOTENCY_TTL or with the task, whichever comes first, so a key whose
-- task is gone is free and the next submit with it creates exactly one new task.
-- With quotas, each submit of an API key takes a token from its bucket (rate, burst), and a
-- submit that would be queued is refused while the key has max_unfinished tasks not final, or
-- while its stored tasks hold max_stored_bytes. A task's bytes count until it expires: they
-- are kept per expiry bucket (1/24 of result_expiry), so the sum costs at most 25 fields (a
-- delayed task's a few more).
-- Scheduling: with single-flight, an identical request of one scope finds the task still in
-- flight through its inflight key (SET NX GET) and is answered with it. A task due later waits
-- in the retry set (promote.lua appends it when due); with priority lanes, a task due now
-- waits in its lane, scored by its API key's next turn, until dispatch.lua hands it out.
-- KEYS: stream, retries, lane_turns, lane_high, lane_normal, lane_low, then per task: task,
--       cache, idempotency, inflight[, quota bucket, unfinished set, stored-bytes hash]
-- ARGV: now, cache_ttl, result_expiry, idempotency_ttl, rate (tokens a second; 0: none),
--       burst, max_unfinished (0: none), quota_keys (1: KEYS carry the three quota keys),
--       JSON [{task_id, request, signature, scope, trace, idempotency, inflight, lane, turn_of,
--       priority, due, deadline}, ..] (the last six only when set),
--       work_channel (announces new entries; "" when no worker waits on it), publish command,
--       max_stored_bytes (0: none),
--       recent_cap (the recent-task index keeps about this many ids; absent or 0: none)
--       where idempotency is 0 (no key), 1 (a key), or the id of a task the caller found gone
--       that the key may still point at (then the key is taken over for this task);
--       inflight likewise: 0 or none (no single-flight), 1, or the id of a task the caller
--       found final; lane: none (append to the stream) or 1..3 (high, normal, low); turn_of:
--       whose turns the lane counts (the scope with FAIR_SHARE, else ""); priority: none for
--       normal; due: Unix seconds, none when due now; deadline: Unix seconds, none for none
--       webhooks (1: KEYS end with the webhook keys; absent or 0: no task carries a webhook)
--       and per task `webhook`: the URL of a request whose webhook asks for `completed`
-- KEYS end with the recent-task index when recent_cap is given, then, with webhooks, the
-- deliveries' due set and messages hash.
-- A cache hit of a request with a webhook records its `completed` delivery (the cached result)
-- in the same step; a submit without a webhook pays nothing for it.
-- Returns JSON, per task {outcome, task_id, result, tokens, reset_ms}, outcome one of
-- 'queued', 'cached' (task_id: the task that computed the result), 'duplicate' (task_id: the
-- key's first task), 'coalesced' (task_id: the identical request's task in flight),
-- 'idempotency_key_reused' (task_id: the key's first task, of another request),
-- 'rate_limited' (reset_ms: until a token is back), 'too_many_unfinished',
-- 'too_many_stored_bytes' (reset_ms: until the oldest stored bytes stop counting);
-- tokens (whole tokens left) is -1 without a rate; reset_ms is until the bucket is full again.
local stream, now, cache_ttl, result_expiry, idempotency_ttl =
  KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local rate, burst, max_unfinished = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local retries, lane_turns = KEYS[2], KEYS[3]
local stride = ARGV[8] == '1' and 7 or 4
local batch = cjson.decode(ARGV[9])
local work_channel, publish = ARGV[10], ARGV[11]
local max_stored = tonumber(ARGV[12]) or 0
local recent_cap = tonumber(ARGV[13] or '0')
local last = #KEYS  -- the last key before the webhook keys
local webhooks_due, webhook_messages = nil, nil
if ARGV[14] == '1' then
  webhooks_due, webhook_messages = KEYS[last - 1], KEYS[last]
  last = last - 2
end
-- A task's Redis cost beyond its request: hash fields, the stream entry, key names.
local TASK_OVERHEAD = 512
local stored_bucket_ms = math.ceil(result_expiry * 1000 / 24)
local queued = 0
-- Every task stored, delayed ones too (queued counts those workers can take now).
local created = {}
local out = {}
local now_ms = nil

local function clock()
  if not now_ms then
    -- The server's clock: every api process fills and drains the same buckets.
    local t = redis.call('TIME')
    now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now_ms
end

-- The task's place in its lane: one past the later of the lane's last turn taken and this
-- key's last turn, so a key with a backlog waits its turns while a new key goes next.
local function enqueue(lane, turn_of, task_id)
  local turns = redis.call('HMGET', lane_turns, 'lane:' .. lane, 'key:' .. lane .. ':' .. turn_of)
  local turn = math.max(tonumber(turns[1]) or 0, tonumber(turns[2]) or 0) + 1
  redis.call('HSET', lane_turns, 'key:' .. lane .. ':' .. turn_of, turn)
  redis.call('ZADD', KEYS[3 + lane], turn, clock() .. ':' .. task_id)
end

-- Takes one token; returns whether there was one, the whole tokens left, and the ms until
-- the bucket is full again (or, when refused, until the next token).
local function take_token(bucket)
  local b = redis.call('HMGET', bucket, 'tokens', 'at')
  local at = tonumber(b[2]) or clock()
  local tokens = math.min(burst, (tonumber(b[1]) or burst) + (clock() - at) * rate / 1000)
  if tokens < 1 then
    return false, 0, math.ceil((1 - tokens) * 1000 / rate)
  end
  tokens = tokens - 1
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'at', clock())
  local full_ms = math.ceil((burst - tokens) * 1000 / rate)
  -- A full bucket is the same as none: the key goes once it would have refilled.
  redis.call('PEXPIRE', bucket, full_ms + 1000)
  return true, math.floor(tokens), full_ms
end

-- The bytes a key's tasks hold that have not expired, dropping buckets that have; and the ms
-- until the oldest live bucket ends.
local function stored_bytes(stored)
  local fields = redis.call('HGETALL', stored)
  local total, first_end = 0, nil
  for f = 1, #fields, 2 do
    local ends = (tonumber(fields[f]) + 1) * stored_bucket_ms
    if ends <= clock() then
      redis.call('HDEL', stored, fields[f])
    else
      total = total + tonumber(fields[f + 1])
      first_end = math.min(first_end or ends, ends)
    end
  end
  return total, (first_end or clock()) - clock()
end

-- A cached result is "task_id:expires_at:result" (finish.lua): the result, the task that
-- computed it, and the second (Unix time) that task expires. Anything else is no hit.
-- Returns the result, the task's id, the whole seconds it has left, and its expiry.
local function cached_result(cache)
  local value = redis.call('GET', cache)
  if not value then
    return false, nil, 0, 0
  end
  local id, expires_at, at = string.match(value, '^([%x%-]+):(%d+):()')
  local ends = tonumber(expires_at) or 0
  local left = ends - math.floor(clock() / 1000)
  if left < 1 then
    return false, nil, 0, 0
  end
  return string.sub(value, at), id, left, ends
end

-- The expiry of a key that names a cached task: `ttl` seconds, or the task's own expiry when
-- that comes first, as SET's option and its argument. The expiry is absolute: finish.lua
-- stamps it in the script that sets the task's TTL, rounded down to the second, so the key
-- never outlives the task. (A TTL of `left` counted from now could, by up to the second that
-- rounding dropped.)
local function expiry_with_task(ttl, left, ends)
  if ttl < left then
    return 'EX', ttl
  end
  return 'EXAT', ends
end

for i, task in ipairs(batch) do
  local base = stride * (i - 1) + 6
  local key, cache, idempotency = KEYS[base + 1], KEYS[base + 2], KEYS[base + 3]
  local inflight, bucket, unfinished, stored =
    KEYS[base + 4], KEYS[base + 5], KEYS[base + 6], KEYS[base + 7]
  local task_id, request, signature, scope, trace, keyed =
    task.task_id, task.request, task.signature, task.scope, task.trace, task.idempotency
  local single_flight, due, deadline = task.inflight or 0, task.due or 0, task.deadline or 0
  if redis.call('EXISTS', key) == 1 then
    -- This very submit ran before and queued its task: answer as then, change nothing, count
    -- nothing. (A hit stores nothing, so sent again it is simply answered again.)
    out[i] = {outcome = 'queued', task_id = task_id, result = '', tokens = -1, reset_ms = 0}
  else
    local existing, existing_signature = false, nil
    if keyed ~= 0 then
      local value = redis.call('GET', idempotency)
      if value then
        -- A value written before signatures were kept is a bare task id: nothing to compare.
        existing, existing_signature = string.match(value, '^([^:]+):(.+)$')
        existing = existing or value
      end
    end
    if existing == keyed then
      existing = false
    end
    local hit, hit_id, hit_left, hit_ends = false, nil, 0, 0
    if not existing then
      hit, hit_id, hit_left, hit_ends = cached_result(cache)
    end
    local refused = nil
    if not existing and not hit and max_unfinished > 0 then
      redis.call('ZREMRANGEBYSCORE', unfinished, '-inf', clock())
      if redis.call('ZCARD', unfinished) >= max_unfinished then
        refused = 'too_many_unfinished'
      end
    end
    local in_flight, claimed = nil, false
    if not existing and not hit and not refused and single_flight ~= 0 then
      if single_flight == 1 then
        in_flight = redis.call('SET', inflight, task_id, 'NX', 'GET', 'EX', result_expiry)
        if in_flight and in_flight == keyed then
          -- The Idempotency-Key's task the caller found gone: this submit replaces it here too.
          redis.call('SET', inflight, task_id, 'EX', result_expiry)
          in_flight = false
        end
      else
        -- The caller found the task this key named final: take the key over, unless another
        -- submit already did.
        in_flight = redis.call('GET', inflight)
        if in_flight == single_flight then
          redis.call('SET', inflight, task_id, 'EX', result_expiry)
          in_flight = false
        end
      end
      claimed = not in_flight
    end
    local allowed, tokens, reset_ms = true, -1, 0
    local size = #request + #signature + #scope + #trace + TASK_OVERHEAD
    if not refused and not existing and not hit and not in_flight and max_stored > 0 then
      local total, until_ms = stored_bytes(stored)
      if total + size > max_stored then
        refused, reset_ms = 'too_many_stored_bytes', until_ms
      end
    end
    if not refused and not in_flight and rate > 0 then
      allowed, tokens, reset_ms = take_token(bucket)
      if not allowed then
        refused = 'rate_limited'
        if claimed then
          redis.call('DEL', inflight)
        end
      end
    end
    if in_flight then
      if keyed ~= 0 then
        redis.call('SET', idempotency, in_flight .. ':' .. signature, 'EX',
          math.min(idempotency_ttl, result_expiry))
      end
      out[i] = {outcome = 'coalesced', task_id = in_flight, result = '', tokens = tokens,
        reset_ms = reset_ms}
    elseif refused then
      out[i] = {outcome = refused, task_id = '', result = '', tokens = tokens, reset_ms = reset_ms}
    elseif existing and existing_signature and existing_signature ~= signature then
      out[i] = {outcome = 'idempotency_key_reused', task_id = existing, result = '',
        tokens = tokens, reset_ms = reset_ms}
    elseif existing then
      out[i] = {outcome = 'duplicate', task_id = existing, result = '', tokens = tokens,
        reset_ms = reset_ms}
    else
      if hit then
        -- Answered with the task that computed the result; nothing new is stored, so hits
        -- cost no memory however many there are.
        local option, at = expiry_with_task(cache_ttl, hit_left, hit_ends)
        redis.call(option == 'EX' and 'EXPIRE' or 'EXPIREAT', cache, at)
        if keyed ~= 0 then
          redis.call('SET', idempotency, hit_id .. ':' .. signature,
            expiry_with_task(idempotency_ttl, hit_left, hit_ends))
        end
        if task.webhook and webhooks_due then
          -- Named by this submit's own id (never stored), so each hit is its own delivery.
          local id = 'msg_' .. task_id
          redis.call('HSET', webhook_messages, id, cjson.encode({id = id, task_id = hit_id,
            scope = scope, url = task.webhook, event = 'completed', at = tonumber(now),
            result = hit,
            data = {task_id = hit_id, status = 'DONE', error = cjson.null, cached = true}}))
          redis.call('ZADD', webhooks_due, now, id)
        end
        out[i] = {outcome = 'cached', task_id = hit_id, result = hit, tokens = tokens,
          reset_ms = reset_ms}
      else
        local fields = {'status', 'PENDING', 'request', request, 'signature', signature,
          'scope', scope, 'created_at', now, 'trace', trace, 'attempts', '0', 'deliveries', '0'}
        -- Stored only when set, so a task that uses none of them costs what it did before.
        if task.priority then
          fields[#fields + 1], fields[#fields + 2] = 'priority', task.priority
        end
        if due > 0 then
          fields[#fields + 1], fields[#fields + 2] = 'run_at', task.due
        end
        if deadline > 0 then
          fields[#fields + 1], fields[#fields + 2] = 'deadline_at', task.deadline
        end
        redis.call('HSET', key, unpack(fields))
        local waits = due > 0 and math.max(0, math.ceil(due - tonumber(now))) or 0
        created[#created + 1] = task_id
        if due > 0 then
          redis.call('ZADD', retries, due, task_id)
        elseif task.lane then
          enqueue(task.lane, task.turn_of, task_id)
          queued = queued + 1
        else
          redis.call('XADD', stream, '*', 'task_id', task_id)
          queued = queued + 1
        end
        if max_unfinished > 0 then
          -- Scored by when the task expires, so one that never finishes stops counting then.
          -- `counted` tells finish.lua to take it off again, whatever the worker's settings.
          redis.call('ZADD', unfinished, clock() + (result_expiry + waits) * 1000, task_id)
          redis.call('PEXPIRE', unfinished, (result_expiry + waits) * 1000)
          redis.call('HSET', key, 'counted', '1')
        end
        if max_stored > 0 then
          local expires = clock() + (result_expiry + waits) * 1000
          redis.call('HINCRBY', stored, math.floor(expires / stored_bucket_ms), size)
          redis.call('PEXPIRE', stored, (result_expiry + waits) * 1000 + stored_bucket_ms)
        end
        -- A delayed task is kept RESULT_EXPIRY past when it is due.
        redis.call('EXPIRE', key, result_expiry + waits)
        if keyed ~= 0 then
          -- Set in the same instant as the task's TTL, and a task's TTL is only ever extended.
          redis.call('SET', idempotency, task_id .. ':' .. signature, 'EX',
            math.min(idempotency_ttl, result_expiry))
        end
        out[i] = {outcome = 'queued', task_id = task_id, result = '', tokens = tokens,
          reset_ms = reset_ms}
      end
    end
  end
end
if #created > 0 and recent_cap > 0 then
  -- One LPUSH a batch; the list is trimmed only once it is a tenth over its cap, so the index
  -- costs about one command a batch and at most 1.1 x recent_cap ids of memory.
  local recent, length = KEYS[last], 0
  for first = 1, #created, 1000 do  -- unpack() is limited to a few thousand values
    length = redis.call('LPUSH', recent, unpack(created, first, math.min(first + 999, #created)))
  end
  if length > recent_cap + math.ceil(recent_cap / 10) then
    redis.call('LTRIM', recent, 0, recent_cap - 1)
  end
end
if queued > 0 and work_channel ~= '' then
  redis.call(publish, work_channel, queued)
end
return cjson.encode(out)
