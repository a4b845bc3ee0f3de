-- LEASE: after a miss, takes the key's fill lease, or says who has it.
-- KEYS[1] lease hash (`h` holder's fill token, `s` its seq, `w` someone waits),
-- KEYS[2] entry hash, KEYS[3] key marker, KEYS[4] pattern markers, KEYS[5] epoch
-- ARGV[1] the fill token, [2] its seq, [3] lease ms, [4] the key
-- Returns {'filled', 0}, {'mine', lease ms} or {'held', ms left}.
-- Filled: stored since the miss's read, in the current epoch (an entry of an
-- older epoch is a miss, as for the read).
local written_in = redis.call('HGET', KEYS[2], 'e')
if written_in and written_in == redis.call('GET', KEYS[5]) then return {'filled', 0} end
local held = redis.call('HMGET', KEYS[1], 'h', 's')
if held[1] then
  -- A lease whose token an invalidation of the key (or of a pattern matching
  -- it) has overtaken is over: its fill would be refused.
  local seq = tonumber(held[2]) or 0
  local over = false
  local m = redis.call('GET', KEYS[3])
  if m and tonumber(m) > seq then over = true end
  if not over then
    for _, p in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. seq, '+inf')) do
      if string.find(ARGV[4], p) then over = true; break end
    end
  end
  if not over then
    redis.call('HSET', KEYS[1], 'w', '1')
    return {'held', redis.call('PTTL', KEYS[1])}
  end
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 'h', ARGV[1], 's', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'mine', tonumber(ARGV[3])}
