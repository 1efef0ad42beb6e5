-- Record webhook deliveries for any worker to send: each message is kept until it is
-- delivered or dead-lettered (webhook_settle.lua), and due at once.
-- KEYS: due (sorted set of message ids by when each is due), messages (hash: id -> message)
-- ARGV: now, then id_1, message_1, id_2, message_2, ..
-- Returns: the number of messages recorded
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
end
return (#ARGV - 1) / 2
