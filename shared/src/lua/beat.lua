-- BEAT: an agent's heartbeat, in the control slot: records the node (score =
-- Redis time) and its report, and returns the smallest node_dead_after_ms any
-- coordinator announced, Redis's time and the registry's epoch.
-- KEYS[1] nodes zset, [2] node report, [3] coordinators hash,
-- [4] registry epoch, [5] registry epoch birth
-- ARGV[1] node id, [2] report JSON, [3] report TTL ms, [4] epoch candidate
local now = now_ms()
local epoch = ensure_epoch(KEYS[4], KEYS[5], ARGV[4])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
local dead_after = false
for _, v in ipairs(redis.call('HVALS', KEYS[3])) do
  local n = tonumber(v)
  if n and (not dead_after or n < dead_after) then dead_after = n end
end
return {dead_after, now, epoch}
