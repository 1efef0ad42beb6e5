-- A client's cancel: a PENDING task becomes CANCELLED at once (its entry is acknowledged by
-- the worker that later receives it); a RUNNING task is flagged for its worker to stop.
-- A cancelled PENDING task records the `completed` webhook its request asked for, in the
-- same step.
-- KEYS: task, the unfinished set of the task's API key, webhooks_due, webhook_messages
-- ARGV: scope, now, events_channel, task_id, publish command (PUBLISH, or SPUBLISH on a cluster)
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

local t = redis.call('HMGET', KEYS[1], 'status', 'scope', 'request', 'attempts', 'started_at')
if not t[1] or (t[2] or '') ~= ARGV[1] then
  return 'not_found'
end
if t[1] == 'PENDING' then
  redis.call('HSET', KEYS[1], 'status', 'CANCELLED', 'finished_at', ARGV[2],
    'error', 'cancelled before it started', 'cancel', '1')
  redis.call('ZREM', KEYS[2], ARGV[4])
  completed_webhook(KEYS[3], KEYS[4], t[3], ARGV[4], t[2] or '', {status = 'CANCELLED',
    error = 'cancelled before it started', attempts = t[4], started_at = t[5],
    finished_at = ARGV[2]})
  redis.call(ARGV[5], ARGV[3], ARGV[4])
  return 'cancelled'
end
if t[1] == 'RUNNING' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  return 'requested'
end
return 'final'
