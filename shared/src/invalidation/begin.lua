-- BEGIN: the fill-token markers of an invalidation's explicit keys, tags and
-- patterns, each set to the mark: one above the log head now.
-- KEYS[1] seq, KEYS[2] pattern markers, KEYS[3] pattern marker times,
-- KEYS[4..] markers (keys, tags)
-- ARGV[1] marker ttl ms, then the patterns as Lua patterns
local now = now_ms()
local mark = tonumber(redis.call('GET', KEYS[1]) or '0') + 1
local marker_ttl = tonumber(ARGV[1])
for i = 4, #KEYS do
  local old = tonumber(redis.call('GET', KEYS[i]) or '0')
  if old < mark then redis.call('SET', KEYS[i], mark, 'PX', marker_ttl) end
end
if #ARGV > 1 then
  local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - marker_ttl, 'LIMIT', 0, 100)
  if #old > 0 then
    redis.call('ZREM', KEYS[2], unpack(old))
    redis.call('ZREM', KEYS[3], unpack(old))
  end
  for i = 2, #ARGV do
    redis.call('ZADD', KEYS[2], 'GT', mark, ARGV[i])
    redis.call('ZADD', KEYS[3], now, ARGV[i])
  end
  redis.call('PEXPIRE', KEYS[2], marker_ttl)
  redis.call('PEXPIRE', KEYS[3], marker_ttl)
end
return mark
