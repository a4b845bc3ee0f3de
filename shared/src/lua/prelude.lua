-- Shared by every script of dcc (prepended to each; see shared/src/script.rs).

-- Redis's clock in Unix milliseconds: every time dcc stores is Redis time.
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end

-- The epoch stored under `epoch_key`, created (with its birth time under
-- `born_key`) from `candidate` when Redis has none: a fresh or emptied dataset.
local function ensure_epoch(epoch_key, born_key, candidate)
  local epoch = redis.call('GET', epoch_key)
  if epoch then return epoch end
  redis.call('SET', epoch_key, candidate)
  redis.call('SET', born_key, now_ms())
  return candidate
end
