#include "dist/mpi_watchdog.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <thread>

#include "dist/detail.h"
#include "dist/process_group.h"

namespace fluxtrain::dist {

namespace {

using Clock = std::chrono::steady_clock;

std::atomic<double> g_timeout_s{600.0};
MPI_Comm g_health = MPI_COMM_NULL;
constexpr int kTagPing = 7001, kTagPong = 7002;

// Answers every pending ping with a pong (a tiny eager send that completes at once).
void serve_pings() {
  if (g_health == MPI_COMM_NULL) return;
  for (;;) {
    int flag = 0;
    MPI_Status st;
    MPI_Iprobe(MPI_ANY_SOURCE, kTagPing, g_health, &flag, &st);
    if (!flag) return;
    int v = 0;
    MPI_Recv(&v, 1, MPI_INT, st.MPI_SOURCE, kTagPing, g_health, MPI_STATUS_IGNORE);
    MPI_Send(&v, 1, MPI_INT, st.MPI_SOURCE, kTagPong, g_health);
  }
}

// Pings every other rank and returns those that do not answer within `grace`. Keeps serving
// pings meanwhile: the other waiting ranks do the same at about the same time.
std::vector<int> silent_ranks(Clock::duration grace) {
  std::vector<int> silent;
  if (g_health == MPI_COMM_NULL) return silent;
  int rank = 0, size = 1;
  MPI_Comm_rank(g_health, &rank);
  MPI_Comm_size(g_health, &size);
  // Static: the sends may still be in flight when the job is aborted.
  static std::vector<int> ping, pong;
  ping.assign(size, 1);
  pong.assign(size, 0);
  std::vector<MPI_Request> sends, recvs;
  std::vector<int> peer;
  for (int r = 0; r < size; ++r) {
    if (r == rank) continue;
    sends.emplace_back();
    MPI_Isend(&ping[r], 1, MPI_INT, r, kTagPing, g_health, &sends.back());
    recvs.emplace_back();
    MPI_Irecv(&pong[r], 1, MPI_INT, r, kTagPong, g_health, &recvs.back());
    peer.push_back(r);
  }
  const auto end = Clock::now() + grace;
  std::vector<int> answered(recvs.size(), 0);
  while (Clock::now() < end) {
    serve_pings();
    bool all = true;
    for (size_t i = 0; i < recvs.size(); ++i) {
      if (!answered[i]) MPI_Test(&recvs[i], &answered[i], MPI_STATUS_IGNORE);
      all = all && answered[i];
    }
    if (all) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  for (size_t i = 0; i < recvs.size(); ++i)
    if (!answered[i]) silent.push_back(peer[i]);
  // The requests are left pending on purpose: the job is about to be aborted.
  return silent;
}

[[noreturn]] void timed_out(const char* what, double timeout_s) {
  // Long enough for a healthy rank that is computing (not waiting in MPI) to come back to a
  // collective and answer; short against the timeout itself.
  const double grace_s = std::clamp(timeout_s / 4, 0.5, 10.0);
  const auto silent = silent_ranks(std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(grace_s)));
  char t[32];
  std::snprintf(t, sizeof t, "%g", timeout_s);
  std::string msg = std::string("MPI ") + what + " did not complete within " + t + " s (--mpi_timeout); ";
  if (g_health == MPI_COMM_NULL) {
    msg += "a peer rank is stopped, hung or lost";
  } else if (silent.empty()) {
    msg += "every rank answered, so they wait in different collectives (a bug: please report it)";
  } else {
    msg += silent.size() == 1 ? "rank " : "ranks ";
    for (size_t i = 0; i < silent.size(); ++i) msg += (i ? "," : "") + std::to_string(silent[i]);
    char g[32];
    std::snprintf(g, sizeof g, "%g", grace_s);
    msg += std::string(" did not answer within ") + g + " s (stopped, hung or lost)";
  }
  fatal(msg + "; aborting the job", 1);
}

}  // namespace

void set_mpi_timeout(double seconds) {
  if (std::isfinite(seconds) && seconds > 0) g_timeout_s.store(seconds);
}

double mpi_timeout() { return g_timeout_s.load(); }

namespace detail {

void init_health_comm() {
  if (g_health != MPI_COMM_NULL) return;
  MPI_Comm_dup(MPI_COMM_WORLD, &g_health);
  MPI_Comm_set_errhandler(g_health, MPI_ERRORS_ARE_FATAL);
}

void free_health_comm() {
  if (g_health != MPI_COMM_NULL && mpi_alive()) MPI_Comm_free(&g_health);
  g_health = MPI_COMM_NULL;
}

void wait_bounded(std::vector<MPI_Request>& reqs, const char* what) {
  if (reqs.empty()) return;
  const int n = static_cast<int>(reqs.size());
  int done = 0;
  MPI_Testall(n, reqs.data(), &done, MPI_STATUSES_IGNORE);
  if (done) return;
  const double timeout_s = mpi_timeout();
  const auto start = Clock::now();
  const auto limit = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
  for (uint64_t spin = 0;; ++spin) {
    MPI_Testall(n, reqs.data(), &done, MPI_STATUSES_IGNORE);
    if (done) return;
    if ((spin & 63) != 0) continue;  // the clock and the ping probe every 64 polls
    serve_pings();
    const auto now = Clock::now();
    if (now > limit) timed_out(what, timeout_s);
    // Spin while a reply is likely to come soon (collectives of a step); then back off so that
    // a long wait (a slow peer saving a checkpoint) does not burn a core.
    const auto waited = now - start;
    if (waited > std::chrono::seconds(1)) std::this_thread::sleep_for(std::chrono::microseconds(500));
    else if (waited > std::chrono::milliseconds(10)) std::this_thread::yield();
  }
}

void wait_bounded(MPI_Request& req, const char* what) {
  std::vector<MPI_Request> v{req};
  wait_bounded(v, what);
  req = v[0];
}

}  // namespace detail
}  // namespace fluxtrain::dist
