-- PUT: stores an entry and indexes it, stamped with the partition's epoch;
-- with a fill token, only if nothing covering it was invalidated since.
-- KEYS[1] entry hash, KEYS[2] epoch, KEYS[3] epoch birth, KEYS[4] pattern markers,
-- KEYS[5 .. 4+nm] markers (key, tags, depends_on keys), then the index zsets
-- (tenant keys, tags, dependents).
-- ARGV[1] value, [2] content type, [3] tags, [4] deps, [5] ttl ms, [6] key,
-- [7] nm, [8] epoch candidate, [9] token epoch ('' without a token),
-- [10] token seq, [11] token issued ms, [12] token ttl ms, [13] the id of the key
-- the value is sealed under ('' for a plaintext value)
local now = now_ms()
local epoch = ensure_epoch(KEYS[2], KEYS[3], ARGV[8])
local nm = tonumber(ARGV[7])
if ARGV[9] ~= '' then
  if epoch ~= ARGV[9] then return 'epoch' end
  if now - tonumber(ARGV[11]) > tonumber(ARGV[12]) then return 'expired' end
  local seq = tonumber(ARGV[10])
  for i = 5, 4 + nm do
    local m = redis.call('GET', KEYS[i])
    if m and tonumber(m) > seq then return 'invalidated' end
  end
  for _, p in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. seq, '+inf')) do
    if string.find(ARGV[6], p) then return 'invalidated' end
  end
end
local ttl = tonumber(ARGV[5])
local expiry = now + ttl
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'ct', ARGV[2], 'tags', ARGV[3], 'deps', ARGV[4], 'e', epoch)
if ARGV[13] ~= '' then redis.call('HSET', KEYS[1], 'x', ARGV[13]) end
redis.call('PEXPIRE', KEYS[1], ttl)
for i = 5 + nm, #KEYS do
  local idx = KEYS[i]
  redis.call('ZADD', idx, 'GT', expiry, ARGV[6])
  local gone = redis.call('ZRANGEBYSCORE', idx, '-inf', now, 'LIMIT', 0, 8)
  if #gone > 0 then redis.call('ZREM', idx, unpack(gone)) end
  local left = redis.call('PTTL', idx)
  if left == -1 or left < ttl then redis.call('PEXPIRE', idx, ttl) end
end
return 'ok'
