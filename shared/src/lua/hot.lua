-- HOT: adds agents' hit counts to the cluster's hot set, halving every
-- score once per decay period (whoever reports first after it), and keeps
-- the set to its most counted members.
-- KEYS[1] hot set, KEYS[2] when it was last halved
-- ARGV[1] decay period ms, [2] most members, then member, count pairs
local now = now_ms()
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if now - last >= tonumber(ARGV[1]) then
  if last > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('ZUNIONSTORE', KEYS[1], 1, KEYS[1], 'WEIGHTS', 0.5)
  end
  redis.call('SET', KEYS[2], now)
end
for i = 3, #ARGV, 2 do
  redis.call('ZINCRBY', KEYS[1], ARGV[i + 1], ARGV[i])
end
local n = redis.call('ZCARD', KEYS[1])
local most = tonumber(ARGV[2])
if n > most then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - most - 1) end
return n
