-- DELETE: one chunk of entries: unlinked, marked for fill tokens, removed from
-- the tenant index, and with cascade their dependents sets read and dropped.
-- KEYS[1] tenant index, KEYS[2] (optional) a draining set to take the chunk from
-- ARGV[1] cascade ('1' or '0'), [2] marker value, [3] marker ttl ms,
-- [4..6] the key prefixes of entries, dependents sets and key markers,
-- then either the chunk size (draining) or the keys themselves
local now = now_ms()
local mark = tonumber(ARGV[2])
local keys
if #KEYS == 2 then
  keys = redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[7]) - 1)
else
  keys = {unpack(ARGV, 7)}
end
if #keys == 0 then return {0, keys, {}} end
-- One call per kind of work, not per key: entries, index records, markers.
local entries, markers = {}, {}
for i, key in ipairs(keys) do
  entries[i] = ARGV[4] .. key
  markers[i] = ARGV[6] .. key
end
local deleted = redis.call('UNLINK', unpack(entries))
redis.call('ZREM', KEYS[1], unpack(keys))
local old = redis.call('MGET', unpack(markers))
for i, marker in ipairs(markers) do
  if not old[i] or tonumber(old[i]) < mark then redis.call('SET', marker, mark, 'PX', ARGV[3]) end
end
local deps = {}
if ARGV[1] == '1' then
  local sets = {}
  for i, key in ipairs(keys) do sets[i] = ARGV[5] .. key end
  -- Most entries have no dependents: one EXISTS tells, before any per-key read.
  if redis.call('EXISTS', unpack(sets)) > 0 then
    for _, set in ipairs(sets) do
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', set, now, '+inf')) do deps[#deps + 1] = m end
    end
    redis.call('UNLINK', unpack(sets))
  end
end
-- The members read above, still first in the set (the script is atomic).
if #KEYS == 2 then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, #keys - 1) end
return {deleted, keys, deps}
