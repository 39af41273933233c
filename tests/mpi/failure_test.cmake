# Runs DistFailure.DISABLED_RankThrowsAtStep under mpirun and checks the failure contract:
# non-zero exit, within 60 s, and the failing rank's "rank R: reason" line on stderr.
# Usage: cmake -DMPIEXEC=<mpirun> -DBIN=<fluxtrain_mpi_tests> -DNP=<ranks> -P failure_test.cmake
string(TIMESTAMP t0 "%s")
execute_process(
  COMMAND ${MPIEXEC} --allow-run-as-root --oversubscribe -np ${NP} ${BIN}
          --gtest_also_run_disabled_tests --gtest_filter=DistFailure.DISABLED_RankThrowsAtStep
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 90)
string(TIMESTAMP t1 "%s")
math(EXPR elapsed "${t1} - ${t0}")
math(EXPR failing "${NP} - 1")
message(STATUS "exit status: ${rc}, ${elapsed} s\n--- stderr ---\n${err}")
if(rc EQUAL 0)
  message(FATAL_ERROR "mpirun exited 0 although rank ${failing} threw")
endif()
if(NOT rc MATCHES "^[0-9]+$")
  message(FATAL_ERROR "mpirun did not exit by itself: ${rc}")
endif()
if(elapsed GREATER 60)
  message(FATAL_ERROR "the job took ${elapsed} s to end (limit 60 s)")
endif()
if(NOT err MATCHES "rank ${failing}: injected failure at step 3: cannot read /nonexistent/batch.h5")
  message(FATAL_ERROR "stderr does not name the failing rank and the reason")
endif()
if(out MATCHES "survived the injected failure" OR err MATCHES "survived the injected failure")
  message(FATAL_ERROR "a rank continued after the failure")
endif()
