-- Decide, for a batch of deliveries, which tasks this consumer runs, and mark those RUNNING.
-- A task already final is only acknowledged, so a redelivery never runs it again or moves it
-- back to RUNNING. A task delivered MAX_DELIVERIES times without finishing is failed and its
-- entry copied to the dead-letter stream. A task delivered before without finishing (it was in
-- flight when a worker died) is a suspect: unless the worker starts it alone, it is left as it
-- is, so that a poison task can only ever take itself down.
-- A task that becomes final here has its RESULT_EXPIRY renewed, and is announced like
-- finish.lua does. A task started renews it only when it is past half of RESULT_EXPIRY old: a
-- task's expiry is set to RESULT_EXPIRY at every change from its submission on, so a younger
-- one has more than half of it left, and a run (bounded by TASK_TIMEOUT) ends well within
-- that; its outcome renews it again. That keeps the common start at two commands a task.
-- The tasks started are announced once per batch on the reports channel, so that an event
-- stream shows RUNNING at once.
-- A task not started by its deadline (deadline_at) is EXPIRED here, and never runs; one that
-- ran an attempt before is past that promise and retried as usual.
-- A task ended here (cancelled, expired, dead-lettered) records the `completed` webhook its
-- request asked for in the same step; a task started costs nothing more for it.
-- Taking: with a count in ARGV[12], the script first reads up to that many new entries of
-- the stream for the consumer (XREADGROUP without blocking) and starts those, in the same
-- call. The worker then has its next batch started while it runs the last one, instead of
-- waiting for a read's reply and then for a start's. The task keys are not declared then:
-- they are made from the task ids read and the partition's key prefix (ARGV[13]). That is
-- why the worker takes only on a single server, never on a cluster (see WorkerSide.takes).
-- KEYS: stream, dead_letter, task_1 .. task_n (none when taking), webhooks_due,
--       webhook_messages
-- ARGV: group, consumer, now, max_deliveries, alone (1: the worker runs this batch alone),
--       JSON [[entry_1, task_id_1], ..] ('[]' when taking), result_expiry, events_channel,
--       dead_letter_maxlen, publish command (PUBLISH, or SPUBLISH on a cluster),
--       reports_channel[, count to take, key prefix]
-- Returns: the JSON array, one object per delivery in order: {verdict, request, signature, scope,
--   traceparent, created_at, attempts} to run ('run'; request is the request's JSON as a
--   string); {verdict, scope} for a task ended here ('cancelled', 'dead', 'expired');
--   {verdict} otherwise. When taking, each object also has the delivery's entry and task_id.
local stream, dead = KEYS[1], KEYS[2]
local group, consumer, now = ARGV[1], ARGV[2], ARGV[3]
local max_deliveries = tonumber(ARGV[4])
local alone = ARGV[5] == '1'
local batch = cjson.decode(ARGV[6])
local result_expiry, channel, dead_maxlen, publish = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local out, acks, finished, started = {}, {}, {}, {}
local webhooks_due, webhook_messages = KEYS[#KEYS - 1], KEYS[#KEYS]
local taking = ARGV[12] ~= nil
local task_keys = {}
if taking then
  local reply = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', ARGV[12],
    'STREAMS', stream, '>')
  if type(reply) == 'table' and reply.err then
    if string.sub(reply.err, 1, 7) ~= 'NOGROUP' then
      return reply
    end
    -- The group vanished (a restart without persistence): made again, with nothing to take.
    redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
    return '[]'
  end
  for _, entry in ipairs(reply and reply[1][2] or {}) do
    local fields = entry[2]
    for j = 1, #(fields or {}), 2 do
      if fields[j] == 'task_id' then
        batch[#batch + 1] = {entry[1], fields[j + 1]}
        task_keys[#batch] = ARGV[13] .. 'task:' .. fields[j + 1]
      end
    end
  end
else
  for i = 1, #batch do
    task_keys[i] = KEYS[i + 2]
  end
end

-- A task ended here sends the `completed` webhook its request asked for, as one the worker
-- ends does: its delivery is recorded with the final status (see webhook_claim.lua).
local function completed_webhook(due, messages, request, task_id, scope, fields)
  local ok, r = pcall(cjson.decode, request or '')
  if not ok or type(r) ~= 'table' or type(r.webhook) ~= 'string' then
    return
  end
  if type(r.webhook_events) == 'table' and #r.webhook_events > 0 then  -- none: the default
    local wanted = false
    for _, event in ipairs(r.webhook_events) do
      wanted = wanted or event == 'completed'
    end
    if not wanted then
      return
    end
  end
  -- Named by the task and the instant it ended: a task run again (a replayed dead letter, a
  -- console retry) ends again, and that ending is news to the receiver, not a duplicate.
  local id = 'msg_' .. task_id .. '_' .. (string.gsub(fields.finished_at, '%D', ''))
  local data = {task_id = task_id, status = fields.status, result = cjson.null,
    error = fields.error, attempts = tonumber(fields.attempts) or 0,
    started_at = tonumber(fields.started_at) or cjson.null,
    finished_at = tonumber(fields.finished_at)}
  redis.call('HSET', messages, id, cjson.encode({id = id, task_id = task_id, scope = scope,
    url = r.webhook, event = 'completed', at = tonumber(fields.finished_at), data = data}))
  redis.call('ZADD', due, fields.finished_at, id)
end

for i, delivery in ipairs(batch) do
  local key, entry, task_id = task_keys[i], delivery[1], delivery[2]
  local t = redis.call('HMGET', key, 'status', 'deliveries', 'cancel', 'request', 'signature',
    'scope', 'trace', 'created_at', 'attempts', 'deadline_at')
  local status = t[1]
  local deliveries = tonumber(t[2] or '0')
  if not status or status == 'DONE' or status == 'FAILED' or status == 'CANCELLED' or
    status == 'EXPIRED' then
    acks[#acks + 1] = entry
    out[i] = {verdict = 'skip'}
  elseif t[3] == '1' then
    redis.call('HSET', key, 'status', 'CANCELLED', 'finished_at', now,
      'error', 'cancelled before it started')
    redis.call('EXPIRE', key, result_expiry)
    completed_webhook(webhooks_due, webhook_messages, t[4], task_id, t[6] or '',
      {status = 'CANCELLED', error = 'cancelled before it started', attempts = t[9],
       finished_at = now})
    acks[#acks + 1] = entry
    finished[#finished + 1] = task_id
    out[i] = {verdict = 'cancelled', scope = t[6] or ''}
  elseif t[10] and tonumber(t[9] or '0') == 0 and tonumber(t[10]) < tonumber(now) then
    redis.call('HSET', key, 'status', 'EXPIRED', 'finished_at', now,
      'error', 'not started by its deadline')
    redis.call('EXPIRE', key, result_expiry)
    completed_webhook(webhooks_due, webhook_messages, t[4], task_id, t[6] or '',
      {status = 'EXPIRED', error = 'not started by its deadline', attempts = t[9],
       finished_at = now})
    acks[#acks + 1] = entry
    finished[#finished + 1] = task_id
    out[i] = {verdict = 'expired', scope = t[6] or ''}
  elseif deliveries >= max_deliveries then
    local message = 'dead-lettered: delivered ' .. deliveries ..
      ' times without finishing (MAX_DELIVERIES=' .. max_deliveries .. ')'
    redis.call('HSET', key, 'status', 'FAILED', 'finished_at', now, 'error', message)
    redis.call('EXPIRE', key, result_expiry)
    completed_webhook(webhooks_due, webhook_messages, t[4], task_id, t[6] or '',
      {status = 'FAILED', error = message, attempts = t[9], finished_at = now})
    redis.call('XADD', dead, 'MAXLEN', dead_maxlen, '*', 'task_id', task_id, 'entry_id', entry,
      'scope', t[6] or '', 'deliveries', deliveries, 'failed_at', now)
    acks[#acks + 1] = entry
    finished[#finished + 1] = task_id
    out[i] = {verdict = 'dead', scope = t[6] or ''}
  elseif deliveries > 0 and not alone then
    out[i] = {verdict = 'suspect'}
  else
    local attempts = tonumber(t[9] or '0') + 1
    redis.call('HSET', key, 'status', 'RUNNING', 'started_at', now, 'owner', consumer,
      'attempts', attempts, 'deliveries', deliveries + 1)
    if (tonumber(now) - (tonumber(t[8]) or 0)) * 2 > tonumber(result_expiry) then
      redis.call('EXPIRE', key, result_expiry)
    end
    started[#started + 1] = task_id
    out[i] = {verdict = 'run', request = t[4], signature = t[5] or '', scope = t[6] or '',
      traceparent = t[7] or '', created_at = t[8] or '0', attempts = attempts}
  end
  if taking then
    out[i].entry, out[i].task_id = entry, task_id
  end
end
if #acks > 0 then
  redis.call('XACK', stream, group, unpack(acks))
end
if #finished > 0 then
  redis.call(publish, channel, table.concat(finished, ' '))
end
if #started > 0 then
  redis.call(publish, ARGV[11], table.concat(started, ' '))
end
if #batch == 0 then
  return '[]'  -- cjson encodes an empty table as an object
end
return cjson.encode(out)
