-- Push back the visibility deadline of claims still held by a token (a learner that
-- keeps its batches claimed until a checkpoint commits them).
-- ARGV: token, visibility_ms, id1, id2, ...  A negative visibility_ms expires the claims
-- now instead (they are requeued by the next sample). Deadlines are per token (per
-- `sample` call): the batch's claims move together. Returns how many of the ids were held.
local token, visibility_ms = ARGV[1], tonumber(ARGV[2])
if #ARGV < 3 then return 0 end
local extended = #sort_claims(token, {unpack(ARGV, 3)})
if extended > 0 then
  local deadline = 0
  if visibility_ms >= 0 then deadline = now_ms() + visibility_ms end
  redis.call('ZADD', K_CLAIMED, 'XX', deadline, token)
end
return extended
