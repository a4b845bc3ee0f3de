-- PUT: stores an entry and indexes it, stamped with the partition's epoch;
-- with a fill token, only if nothing covering it was invalidated since. A
-- write ends the key's fill lease (so does a refused fill of the lease's
-- holder), and tells the agents waiting for it (see lease.lua).
-- KEYS[1] entry hash, KEYS[2] epoch, KEYS[3] epoch birth, KEYS[4] pattern markers,
-- KEYS[5] lease hash, KEYS[6] fills channel,
-- KEYS[7 .. 6+nm] markers (key, tags, depends_on keys), then the index zsets
-- (tenant keys, tags, dependents).
-- ARGV[1] value, [2] content type, [3] tags, [4] deps, [5] ttl ms, [6] key,
-- [7] nm, [8] epoch candidate, [9] token epoch ('' without a token),
-- [10] token seq, [11] token issued ms, [12] token ttl ms, [13] the id of the key
-- the value is sealed under ('' for a plaintext value), [14] the fill token as
-- given ('' without one), [15] publish command, [16] the fill notice
local now = now_ms()
local epoch = ensure_epoch(KEYS[2], KEYS[3], ARGV[8])
local nm = tonumber(ARGV[7])
-- Ends the lease and wakes its waiters, if any agent waits.
local function end_lease()
  local waited = redis.call('HGET', KEYS[5], 'w')
  redis.call('DEL', KEYS[5])
  if waited then redis.call(ARGV[15], KEYS[6], ARGV[16]) end
end
-- A refused fill: the lease ends if it was this token's.
local function refuse(why)
  if ARGV[14] ~= '' and redis.call('HGET', KEYS[5], 'h') == ARGV[14] then end_lease() end
  return why
end
if ARGV[9] ~= '' then
  if epoch ~= ARGV[9] then return refuse('epoch') end
  if now - tonumber(ARGV[11]) > tonumber(ARGV[12]) then return refuse('expired') end
  local seq = tonumber(ARGV[10])
  for i = 7, 6 + nm do
    local m = redis.call('GET', KEYS[i])
    if m and tonumber(m) > seq then return refuse('invalidated') end
  end
  for _, p in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. seq, '+inf')) do
    if string.find(ARGV[6], p) then return refuse('invalidated') end
  end
end
local ttl = tonumber(ARGV[5])
local expiry = now + ttl
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'ct', ARGV[2], 'tags', ARGV[3], 'deps', ARGV[4], 'e', epoch, 't', ttl)
if ARGV[13] ~= '' then redis.call('HSET', KEYS[1], 'x', ARGV[13]) end
redis.call('PEXPIRE', KEYS[1], ttl)
for i = 7 + nm, #KEYS do
  local idx = KEYS[i]
  redis.call('ZADD', idx, 'GT', expiry, ARGV[6])
  local gone = redis.call('ZRANGEBYSCORE', idx, '-inf', now, 'LIMIT', 0, 8)
  if #gone > 0 then redis.call('ZREM', idx, unpack(gone)) end
  local left = redis.call('PTTL', idx)
  if left == -1 or left < ttl then redis.call('PEXPIRE', idx, ttl) end
end
end_lease()
return 'ok'
