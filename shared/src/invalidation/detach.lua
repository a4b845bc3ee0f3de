-- DETACH: renames each tag's set to its draining set (O(1)), unless a
-- draining set is already there.
-- KEYS: pairs of (tag set, its draining set); returns one status per pair:
-- 0 nothing to drain, 1 a leftover draining set, 2 members detached
local found = {}
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i + 1]) == 1 then
    found[#found + 1] = 1
  elseif redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('RENAME', KEYS[i], KEYS[i + 1])
    found[#found + 1] = 2
  else
    found[#found + 1] = 0
  end
end
return found
